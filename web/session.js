// The session pages: /sessions lists the recorded sessions; /sessions/<id> draws one of them
// from /api/sessions/<id> (voicebus/timeline.py): who spoke when, each turn's words, what the
// user heard of each reply, interruptions, and each turn's latency waterfall.
// Everything shown is the users' own words: it enters the page as text nodes only, never as
// HTML.
'use strict';

(() => {
  const SESSION_RE = /^[A-Za-z0-9_-]{1,64}$/; // what the bus accepts as a session id
  const $ = (id) => document.getElementById(id);

  // An element with attributes (data-*, class, title…) and children (strings become text).
  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (value !== undefined && value !== null) node.setAttribute(name, String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined || child === '') continue;
      node.append(typeof child === 'string' || typeof child === 'number' ? String(child) : child);
    }
    return node;
  }

  const ms = (value) => `${Math.round(value)} ms`;
  const signedMs = (value) => (value < 0 ? `\u2212${ms(-value)}` : `+${ms(value)}`);
  const seconds = (value) => `${(value / 1000).toFixed(2)} s`;
  const percent = (value, total) => `${Math.max(0, Math.min(100, (value / total) * 100))}%`;

  async function getJSON(url) {
    const resp = await fetch(url, { headers: { Accept: 'application/json' }, cache: 'no-store' });
    let body = null;
    try { body = await resp.json(); } catch (_) { /* not JSON: say the status */ }
    if (!resp.ok) {
      const detail = body && typeof body.detail === 'string' ? body.detail : resp.statusText;
      throw new Error(`${resp.status}: ${detail || 'request failed'}`);
    }
    return body;
  }

  function showError(message) {
    $('error').textContent = message;
    $('error').hidden = false;
    document.body.dataset.loaded = 'error';
  }

  // ---- /sessions ----

  async function showList() {
    const { sessions } = await getJSON('/api/sessions');
    const rows = $('sessions').tBodies[0];
    for (const { session, messages } of sessions) {
      const link = el('a', {}, session);
      link.href = `/sessions/${encodeURIComponent(session)}`;
      rows.append(el('tr', { 'data-session': session }, el('td', {}, link),
        el('td', {}, messages)));
    }
    if (!sessions.length) rows.append(el('tr', {}, el('td', { colspan: 2 }, 'nothing captured')));
    $('summary').textContent = `${sessions.length} captured`;
    $('list').hidden = false;
  }

  // ---- /sessions/<id> ----

  async function showSession(id) {
    const t = await getJSON(`/api/sessions/${encodeURIComponent(id)}`);
    document.title = `voicebus · ${t.session}`;
    const started = t.start_ns ? new Date(t.start_ns / 1e6).toLocaleString() : 'unknown';
    const ended = t.ended ? `, ended: ${t.ended}` : '';
    $('summary').textContent = `${t.session} · ${started} · ${seconds(t.duration_ms)} · ` +
      `${t.turns.length} turns${ended}`;
    drawLanes(t);
    // What each provider did over the session (voicebus_usage, docs/observability.md).
    for (const use of t.usage || []) {
      $('lanes').append(el('p', { class: 'note usage', 'data-stage': use.stage }, usageLine(use)));
    }
    for (const turn of t.turns) $('turns').append(drawTurn(turn));
    drawLog(t.marks);
    $('timeline').hidden = false;
  }

  // Two lanes on one time axis: the user's utterances and the agent's replies as played.
  function drawLanes(t) {
    const total = Math.max(t.duration_ms, 1);
    const lane = (who) => {
      const track = el('div', { class: 'track' });
      for (const span of t.spans.filter((s) => s.who === who)) {
        const bar = el('span', {
          class: 'span', 'data-turn': span.turn, 'data-interrupted': span.interrupted,
          title: `turn ${span.turn ?? '?'}: ${seconds(span.start_ms)} – ${seconds(span.end_ms)}` +
            (span.interrupted ? ' (cut)' : ''),
        });
        bar.style.left = percent(span.start_ms, total);
        bar.style.width = percent(Math.max(span.end_ms - span.start_ms, 0), total);
        track.append(bar);
      }
      if (who === 'agent') {
        for (const turn of t.turns.filter((x) => x.cancelled_ms !== null)) {
          const cut = el('span', { class: 'cut-mark', title: `turn ${turn.turn} cut` });
          cut.style.left = percent(turn.cancelled_ms, total);
          track.append(cut);
        }
      }
      return el('div', { class: 'lane', 'data-who': who },
        el('span', { class: 'who' }, who), track);
    };
    $('lanes').append(lane('user'), lane('agent'),
      el('div', { class: 'axis' }, el('span', {}, '0 s'), el('span', {}, seconds(total))));
  }

  function drawTurn(turn) {
    // The agent's own turns say so in their kind; of the judge's verdicts, only "ignore" adds.
    const tags = [turn.kind, turn.verdict === 'ignore' ? 'ignored' : '',
      turn.interrupted ? 'interrupted' : ''].filter(Boolean);
    const head = el('h3', {}, `turn ${turn.turn}`,
      ...tags.map((tag) => el('span', { class: 'tag', 'data-tag': tag }, tag)));
    const v2v = voiceToVoice(turn.waterfall);
    if (v2v !== null) head.append(el('span', { class: 'v2v' }, `voice to voice ${ms(v2v)}`));
    const box = el('article', {
      class: 'turn', 'data-turn': turn.turn, 'data-kind': turn.kind,
      'data-interrupted': turn.interrupted,
    }, head);
    if (turn.said || turn.partials.length) box.append(userLine(turn));
    if (turn.reason) {
      box.append(el('p', { class: 'note' }, `judged: ${turn.verdict}, ${turn.reason}`));
    }
    if (turn.reply || turn.heard) box.append(agentLine(turn));
    if (turn.error) box.append(el('p', { class: 'note bad' }, `error: ${turn.error}`));
    if (turn.waterfall.length) box.append(drawWaterfall(turn.waterfall));
    for (const use of turn.usage || []) {
      box.append(el('p', { class: 'note usage', 'data-stage': use.stage }, usageLine(use)));
    }
    return box;
  }

  // "llm openai: 2 requests, 120 input tokens, 12 output tokens, $0.000031" (timeline.usage_line)
  function usageLine(u) {
    const parts = [];
    if (u.turns > 1) parts.push(`${u.turns} turns`);
    parts.push(`${u.requests} request${u.requests === 1 ? '' : 's'}`);
    if (u.input_tokens || u.output_tokens) {
      const cached = u.cached_tokens ? ` (${u.cached_tokens} cached)` : '';
      parts.push(`${u.input_tokens} input tokens${cached}`, `${u.output_tokens} output tokens`);
    }
    if (u.characters) parts.push(`${u.characters} characters`);
    if (u.audio_in_s) parts.push(`${u.audio_in_s.toFixed(2)} s of audio in`);
    if (u.audio_out_s) parts.push(`${u.audio_out_s.toFixed(2)} s of audio out`);
    if (u.cost_usd !== null && u.cost_usd !== undefined) parts.push(`$${u.cost_usd.toFixed(6)}`);
    return `${u.stage} ${u.provider}: ${parts.join(', ')}${u.failed ? ' (failed)' : ''}`;
  }

  function userLine(turn) {
    const line = el('p', { class: 'said', 'data-speaker': 'user' }, turn.said || '(no words)');
    if (turn.speech_ms) line.append(el('small', {}, ` ${ms(turn.speech_ms)} of speech`));
    if (!turn.partials.length) return line;
    const partials = el('details', { class: 'partials' },
      el('summary', {}, `${turn.partials.length} partial transcripts`),
      el('ol', {}, ...turn.partials.map((p) => el('li', {}, `${seconds(p.at_ms)} `, p.text))));
    return el('div', {}, line, partials);
  }

  // The reply, split where the user stopped hearing it.
  function agentLine(turn) {
    const heard = turn.heard;
    const line = el('p', { class: 'reply', 'data-speaker': 'agent' });
    if (!heard) {
      line.append(el('span', { class: 'unheard' }, turn.reply));
      return el('div', {}, line, el('p', { class: 'note' }, 'never played'));
    }
    line.append(el('span', { class: 'heard' }, heard.text),
      el('span', { class: 'unheard' }, heard.unheard));
    let note = `heard ${ms(heard.played_ms)}`;
    if (heard.interrupted) note += `, cut after “${lastWords(heard.text)}”`;
    else if (!heard.final) note += ', still playing when the capture ends';
    else if (heard.unheard) note += ', not all of it';
    else note += ', all of it';
    return el('div', {}, line, el('p', { class: 'note' }, note));
  }

  function lastWords(text) {
    const words = text.trim().split(/\s+/).filter(Boolean);
    return words.length ? `…${words.slice(-3).join(' ')}` : 'nothing';
  }

  function voiceToVoice(steps) {
    const first = steps[0], last = steps[steps.length - 1];
    if (!first || first.name !== 'end of speech' || last.name !== 'playback start') return null;
    return last.since_ms;
  }

  // One row per step: a bar from the step before to this one, on the turn's own scale.
  function drawWaterfall(steps) {
    const total = Math.max(steps[steps.length - 1].since_ms, 1);
    const rows = steps.map((step) => {
      const bar = el('span', { class: 'bar' });
      bar.style.left = percent(step.since_ms - step.delta_ms, total);
      bar.style.width = percent(step.delta_ms, total);
      return el('tr', { 'data-step': step.name, 'data-since-ms': Math.round(step.since_ms) },
        el('th', {}, step.name), el('td', { class: 'track' }, bar),
        el('td', {}, signedMs(step.delta_ms)), el('td', {}, ms(step.since_ms)));
    });
    return el('table', { class: 'waterfall' },
      el('thead', {}, el('tr', {}, el('th', {}, 'step'), el('th', {}, ''),
        el('th', {}, 'since the step before'), el('th', {}, 'since the first'))),
      el('tbody', {}, ...rows));
  }

  function drawLog(marks) {
    const rows = $('events').tBodies[0];
    for (const m of marks) {
      rows.append(el('tr', { 'data-kind': m.kind }, el('td', {}, seconds(m.at_ms)),
        el('td', {}, m.source), el('td', {}, m.turn ?? ''), el('td', {}, m.detail)));
    }
    $('log').querySelector('summary').textContent = `Every event (${marks.length})`;
  }

  async function main() {
    const path = window.location.pathname.replace(/\/+$/, '');
    try {
      if (path === '/sessions') {
        await showList();
      } else {
        const id = decodeURIComponent(path.slice('/sessions/'.length));
        if (!SESSION_RE.test(id)) throw new Error('not a session id');
        await showSession(id);
      }
      document.body.dataset.loaded = 'true';
    } catch (err) {
      showError(err instanceof Error ? err.message : String(err));
    }
  }

  main();
})();
