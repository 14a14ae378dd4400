"""The streaming resampler of the live paths (services/runtime/resample.py): each chunk's output
comes at once, in place, and a stream's whole length comes out."""

from __future__ import annotations

import numpy as np
import pytest
import soxr

from services.runtime.resample import StreamResampler

PAIRS = [(8000, 16000), (16000, 8000), (16000, 48000), (22050, 48000), (48000, 16000),
         (22050, 16000)]


@pytest.mark.parametrize("in_rate, out_rate", PAIRS)
def test_every_20_ms_chunk_gives_its_output_at_once(in_rate: int, out_rate: int) -> None:
    """soxr's streaming mode gives nothing for up to five chunks, then a block (the latency this
    class exists to avoid); here every chunk after the first gives its own 20 ms."""
    resampler = StreamResampler(in_rate, out_rate)
    chunk = np.zeros(in_rate // 50, dtype=np.int16)
    sizes = [len(resampler.process(chunk)) // 2 for _ in range(20)]
    assert sizes[0] > 0
    assert all(abs(size - out_rate // 50) <= 1 for size in sizes[1:]), sizes
    # What the library we replaced does with the same chunks, to keep the claim honest.
    block = soxr.ResampleStream(in_rate, out_rate, 1, dtype="int16")
    assert 0 in [len(block.resample_chunk(chunk)) for _ in range(20)]


@pytest.mark.parametrize("in_rate, out_rate", PAIRS)
def test_a_stream_comes_out_whole_and_in_place(in_rate: int, out_rate: int) -> None:
    pcm = np.zeros(in_rate, dtype=np.int16)
    pcm[in_rate // 2] = 20000  # a click in the middle, and one at the very end
    pcm[-5] = 20000
    resampler = StreamResampler(in_rate, out_rate)
    step = in_rate // 50
    out = b"".join(resampler.process(pcm[i:i + step]) for i in range(0, in_rate, step))
    out = np.frombuffer(out + resampler.flush(), dtype=np.int16)
    assert len(out) == out_rate
    ratio = out_rate / in_rate
    peaks = np.sort(np.argsort(np.abs(out))[-2:])
    # Each click where it was (within a sample), not a filter's length later.
    assert abs(peaks[0] - in_rate // 2 * ratio) <= 2 and abs(peaks[1] - (in_rate - 5) * ratio) <= 2
    # Flushed, it is ready for a new stream: the same input gives the same output.
    again = resampler.process(pcm[:step])
    assert again == StreamResampler(in_rate, out_rate).process(pcm[:step])
