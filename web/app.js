// voicebus in the browser: join a LiveKit room with a token from the token service, talk (or
// type) to the agent, and show what both sides said, the agent's state and how long each answer
// took. A room that drops the page (livekit-server restarted, the network went) is joined again.
// A plain script with no build step: livekit-client's UMD build defines the global LivekitClient.
'use strict';

(() => {
  const LK = window.LivekitClient;
  const AGENT = 'voicebus-agent';
  const STATE_ATTR = 'lk.agent.state';
  const MEETING_ATTR = 'voicebus.meeting'; // set by the agent when everyone in the room is heard
  const TOPIC = 'lk.transcription';
  const CHAT_TOPIC = 'lk.chat'; // what LiveKit Agents reads typed messages from
  const CHAT_MAX = 2000;        // characters a message; the agent drops longer ones
  // A typed message is sent again, under the same id (the agent reads it once), until its
  // words come back as the user's line: a message sent as livekit-server restarted can be lost
  // in the room without an error here. Again at once after a reconnect, then every few seconds.
  const CHAT_ID_ATTR = 'voicebus.message_id';
  const CHAT_RESEND_MS = 4000;
  const CHAT_GIVE_UP_MS = 30000;
  const ROOM_RE = /^[A-Za-z0-9_-]{1,64}$/; // what the token service accepts
  // Leaving the room for these was somebody's decision (the user left, another tab took this
  // identity, the participant was removed, the room deleted): the page stays out. Any other
  // disconnect (livekit-server restarted, the network went, livekit-client's own reconnection
  // gave up) is followed by joining the same room again as the same participant.
  const FINAL_DISCONNECTS = new Set(['CLIENT_INITIATED', 'DUPLICATE_IDENTITY',
                                     'PARTICIPANT_REMOVED', 'ROOM_DELETED', 'ROOM_CLOSED']);
  const REJOIN_FIRST_MS = 500;     // before the first attempt (jittered), doubled after each…
  const REJOIN_MAX_MS = 5000;      // …up to this
  const REJOIN_GIVE_UP_MS = 120000;

  // Levels are the RMS of the analyser's waveform in dBFS. Speech into a microphone sits around
  // -35..-15 dBFS, noise-suppressed room noise well below -50, decoded Opus silence near -inf.
  const USER_SPEECH_DBFS = -45;
  const AGENT_AUDIO_DBFS = -50;
  const METER_FLOOR_DBFS = -60; // the bottom of the #level meter
  // Levels are polled on a timer rather than per animation frame: the poll period is the
  // resolution of the latency figures, and a timer keeps going when the page is not painted.
  const SAMPLE_MS = 20;

  const $ = (id) => document.getElementById(id);
  const ui = {
    form: $('join-form'), room: $('room'), name: $('name'), join: $('join'), leave: $('leave'),
    mic: $('mic'), level: $('level'), state: $('state'), transcript: $('transcript'),
    latency: $('latency').tBodies[0], error: $('error'), status: $('status'),
    startAudio: $('start-audio'), audio: $('agent-audio'),
    chat: $('chat-form'), chatText: $('chat-text'), send: $('send'),
  };

  let room = null;        // the LiveKit Room while joining or joined
  let session = null;     // {room, name, identity} while in a session: what a rejoin asks for
  let rejoining = false;  // a rejoin is under way: its failed attempts are not the end
  let rejoinRuns = 0;     // rejoins started: only the newest goes on
  let returns = 0;        // times the page got back into the room after a drop
  let audioCtx = null;    // one AudioContext for both level meters
  let sampler = 0;        // setInterval id of the level poll
  let meters = {};        // 'mic' | 'agent' -> {mst, source, analyser, buf}
  let agentTrack = null;  // the agent's RemoteAudioTrack
  let segments = new Map(); // lk.segment_id -> {el, seq, final}
  let agentState = '';
  let lastSpeechAt = 0;   // performance.now() of the last mic sample above USER_SPEECH_DBFS
  let lastSentAt = 0;     // performance.now() of the last typed message sent
  let sending = false;    // a typed message is on its way
  let unseen = [];        // typed messages not yet back as the user's line: {id, text, at, timer}
  let lastTurnAt = 0;     // when the previous turn started: older speech belongs to that turn
  let turns = 0;
  let pending = null;     // the turn being timed: {speechEnd, row, spoke, heard}
  const left = new WeakSet(); // rooms the user left: their failures are not errors

  // ---- joining and leaving ----

  async function join() {
    clearError();
    const roomName = ui.room.value.trim();
    if (!ROOM_RE.test(roomName)) {
      showError('Room name: 1 to 64 letters, digits, "_" or "-".');
      return;
    }
    // Made (or resumed) inside the click: browsers only let audio start from a user gesture.
    audioCtx = audioCtx || new AudioContext();
    audioCtx.resume().catch(() => {});
    resetSession();
    const r = room = newRoom();
    setPhase('connecting', 'asking for a token…');
    try {
      const name = ui.name.value.trim();
      const grant = await fetchToken(roomName, name);
      if (room !== r) return; // Leave was clicked meanwhile
      setPhase('connecting', 'connecting…');
      // A rejoin asks for the same room as the same participant (the identity the token
      // service gave): ingress goes on hearing this user, the agent answers the same session.
      await enter(r, grant, { room: roomName, name, identity: grant.identity });
    } catch (err) {
      if (left.has(r)) return; // cancelled by Leave: not an error
      showError(err); // after a Disconnected event, if any: the connect error says more
      if (room === r) teardown();
      r.disconnect();
    }
  }

  // Connects ``r`` with ``grant`` (throws if that fails) and starts what a room needs here:
  // the agent's state, the level meters, audio, the microphone. Once connected, a drop of the
  // room is followed by a rejoin that asks for ``wanted`` (a first join that fails is not).
  async function enter(r, grant, wanted) {
    await r.connect(grant.url, grant.token);
    if (room !== r) return;
    // In from here: a drop from now on (even before the microphone is on) is a new outage.
    rejoining = false;
    session = wanted;
    setPhase('connected', `in room ${grant.room} as ${grant.identity}`);
    for (const p of r.remoteParticipants.values()) { if (p.identity === AGENT) showState(p.attributes[STATE_ATTR]); }
    clearInterval(sampler);
    sampler = setInterval(sample, SAMPLE_MS);
    // Still close enough to the click for autoplay; the button covers browsers that disagree.
    const playable = () => { if (room === r) ui.startAudio.hidden = r.canPlaybackAudio; };
    r.startAudio().then(playable, playable);
    // Without a microphone the user can still listen, so a refusal does not end the call.
    try {
      await r.localParticipant.setMicrophoneEnabled(true);
    } catch (err) {
      if (room === r) showError(micError(err));
    }
    showMic();
  }

  // The room dropped us for no decision of anyone's: join it again, same room, same identity,
  // with a fresh token from the token service (which also sends the agent again if the session
  // ended meanwhile). livekit-client has already retried on its own (with the token
  // livekit-server keeps refreshing, so a short token TTL never matters while connected); this
  // covers a longer outage and a server that sent everyone away. Capped, jittered backoff; the
  // transcript and the latency table stay: it is the same conversation.
  async function rejoin(reason) {
    const wanted = session;
    const run = ++rejoinRuns; // a newer outage's rejoin replaces this one
    rejoining = true;
    offline();
    showState('');
    setPhase('reconnecting', `reconnecting… (${reason})`);
    const since = performance.now();
    let delay = REJOIN_FIRST_MS;
    try {
      for (let attempt = 1; ; attempt++) {
        await new Promise((done) => setTimeout(done, delay / 2 + Math.random() * delay / 2));
        if (session !== wanted || run !== rejoinRuns) return; // Leave was clicked, or superseded
        const r = room = newRoom();
        try {
          const grant = await fetchToken(wanted.room, wanted.name, wanted.identity);
          if (session !== wanted || room !== r) { r.disconnect(); return; }
          await enter(r, grant, wanted);
          if (room !== r) return;
          returns += 1;
          document.body.dataset.returns = String(returns);
          resendUnseen();
          return;
        } catch (err) {
          r.disconnect();
          if (session !== wanted) return;
          if (performance.now() - since > REJOIN_GIVE_UP_MS) {
            showError(`Could not get back into the room: ${err && err.message ? err.message : err}`);
            teardown();
            return;
          }
          ui.status.textContent = `reconnecting… (attempt ${attempt} failed)`;
          delay = Math.min(delay * 2, REJOIN_MAX_MS);
        }
      }
    } finally {
      if (run === rejoinRuns) rejoining = false;
    }
  }

  async function leave() {
    const r = room;
    session = null; // no more rejoining
    if (!r) { teardown(); return; }
    left.add(r);
    teardown(); // first, so the Disconnected event of this room is not shown as an error
    await r.disconnect();
  }

  async function fetchToken(roomName, name, identity) {
    const body = { room: roomName };
    if (name) body.name = name;
    if (identity) body.identity = identity; // a rejoin: the same participant as before
    // The agent to talk to: the page's own ?agent= (GET /api/agents lists them).
    const agent = new URLSearchParams(window.location.search).get('agent');
    if (agent) body.agent = agent;
    let res;
    try {
      res = await fetch('/api/token', {
        method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body),
      });
    } catch (err) {
      throw new Error(`Cannot reach the token service (${err.message}).`);
    }
    const data = await res.json().catch(() => ({}));
    if (res.status === 429) {
      const wait = retryAfter(res.headers.get('Retry-After'));
      throw new Error(wait == null ? 'Too many requests, retry later.' : `Too many requests, retry in ${wait} s.`);
    }
    if (!res.ok) throw new Error(`Token service: ${detailText(data.detail) || `${res.status} ${res.statusText}`}`);
    return data;
  }

  // Retry-After is either seconds or an HTTP date.
  function retryAfter(header) {
    if (!header) return null;
    const seconds = Number(header);
    if (Number.isFinite(seconds)) return Math.max(0, Math.ceil(seconds));
    const at = Date.parse(header);
    return Number.isNaN(at) ? null : Math.max(0, Math.ceil((at - Date.now()) / 1000));
  }

  // FastAPI's detail is a string, or for a malformed request a list of {loc, msg}.
  function detailText(detail) {
    if (!detail || typeof detail === 'string') return detail || '';
    if (!Array.isArray(detail)) return JSON.stringify(detail);
    return detail.map((e) => {
      const where = ((e && e.loc) || []).filter((part) => part !== 'body').join('.');
      return e && e.msg ? (where ? `${where}: ${e.msg}` : e.msg) : JSON.stringify(e);
    }).join('; ');
  }

  function newRoom() {
    const E = LK.RoomEvent;
    // Audio only, one remote speaker: adaptive stream and dynacast are for video.
    const r = new LK.Room({ adaptiveStream: false, dynacast: false });
    const mine = (fn) => (...args) => { if (room === r) fn(...args); }; // ignore a room we left
    r.on(E.ParticipantConnected, mine((p) => { if (p.identity === AGENT) showState(p.attributes[STATE_ATTR]); }))
      .on(E.ParticipantDisconnected, mine((p) => { if (p.identity === AGENT) showState(''); }))
      .on(E.ParticipantAttributesChanged, mine((changed, p) => {
        if (p.identity === AGENT && STATE_ATTR in changed) showState(changed[STATE_ATTR]);
      }))
      .on(E.TrackSubscribed, mine(onTrackSubscribed))
      .on(E.TrackUnsubscribed, mine((track) => {
        track.detach().forEach((el) => el.remove());
        if (track === agentTrack) agentTrack = null;
      }))
      .on(E.AudioPlaybackStatusChanged, mine(() => { ui.startAudio.hidden = r.canPlaybackAudio; }))
      // livekit-client's own reconnection (a resume, or a full reconnect to a restarted server).
      .on(E.Reconnecting, mine(() => setPhase('reconnecting', 'reconnecting…')))
      .on(E.Reconnected, mine(() => {
        setPhase('connected', `in room ${r.name} as ${r.localParticipant.identity}`);
        returns += 1;
        document.body.dataset.returns = String(returns);
        showMic();
        resendUnseen();
      }))
      .on(E.MediaDevicesError, mine((err) => showError(micError(err))))
      .on(E.Disconnected, mine((reason) => {
        if (rejoining) return; // an attempt of the rejoin that failed: it tries again
        const name = LK.DisconnectReason[reason] || 'UNKNOWN_REASON';
        const said = name.toLowerCase().replace(/_/g, ' ');
        if (session && !FINAL_DISCONNECTS.has(name)) {
          rejoin(said);
          return;
        }
        showError(`Disconnected: ${said}.`);
        teardown();
      }));
    r.registerTextStreamHandler(TOPIC, (reader, info) => { if (room === r) onTranscript(reader, info); });
    return r;
  }

  function onTrackSubscribed(track, publication, participant) {
    if (track.kind !== LK.Track.Kind.Audio) return;
    ui.audio.appendChild(track.attach()); // playing it is also what feeds Chrome's Web Audio
    if (participant.identity === AGENT) agentTrack = track;
  }

  // Stops everything of the current room in the page; the caller disconnects the room itself.
  function teardown() {
    room = null;
    session = null;
    forgetUnseen();
    offline();
    ui.startAudio.hidden = true;
    showState('');
    setPhase('idle', 'not connected');
    showMic();
  }

  // What a room that is gone leaves in the page: its meters, its audio, a turn being timed.
  function offline() {
    clearInterval(sampler);
    for (const m of Object.values(meters)) m.source.disconnect();
    meters = {};
    agentTrack = null;
    ui.audio.replaceChildren();
    finishTurn();
    ui.level.value = 0;
  }

  function resetSession() {
    segments = new Map();
    ui.transcript.replaceChildren();
    ui.latency.replaceChildren();
    turns = 0;
    pending = null;
    lastSpeechAt = lastSentAt = lastTurnAt = 0;
  }

  // ---- typing ----

  // The message goes to the agent as a text stream on lk.chat; it shows in the transcript when
  // the agent has taken it as the user's turn (its transcript of it comes back like speech).
  async function sendChat() {
    const r = room;
    const text = ui.chatText.value.trim();
    if (!r || sending || !text) return;
    if (text.length > CHAT_MAX) {
      showError(`A message may have at most ${CHAT_MAX} characters.`);
      return;
    }
    clearError();
    sending = true;
    showChat();
    lastSentAt = performance.now(); // a typed turn is timed from Send
    const msg = { id: messageId(), text, at: performance.now(), timer: 0 };
    unseen.push(msg); // before it goes: its line may come back before the send returns
    try {
      await deliver(r, msg);
      if (unseen.includes(msg)) resendLater(msg, CHAT_RESEND_MS);
      if (room === r && ui.chatText.value.trim() === text) ui.chatText.value = '';
    } catch (err) {
      unseen = unseen.filter((m) => m !== msg);
      if (room === r) showError(`Not sent: ${err && err.message ? err.message : err}`);
    } finally {
      sending = false;
      showChat();
      if (room === r) ui.chatText.focus();
    }
  }

  function deliver(r, msg) {
    return r.localParticipant.sendText(msg.text, {
      topic: CHAT_TOPIC, attributes: { [CHAT_ID_ATTR]: msg.id },
    });
  }

  // Not back as the user's line after ``delay``: send it again (a rejoin's new room, if any),
  // until CHAT_GIVE_UP_MS after Send.
  function resendLater(msg, delay) {
    clearTimeout(msg.timer);
    msg.timer = setTimeout(() => {
      if (!unseen.includes(msg)) return;
      if (performance.now() - msg.at > CHAT_GIVE_UP_MS) {
        unseen = unseen.filter((m) => m !== msg);
        showError(`The agent did not get "${msg.text.slice(0, 60)}": please send it again.`);
        return;
      }
      const r = room;
      if (r && document.body.dataset.phase === 'connected') deliver(r, msg).catch(() => {});
      resendLater(msg, CHAT_RESEND_MS);
    }, delay);
  }

  // Back in the room: what was typed and not yet seen may have been lost with the old one.
  function resendUnseen() {
    for (const msg of unseen) resendLater(msg, 0);
  }

  // The user's line came back: the oldest message with these words arrived.
  function seen(text) {
    const msg = unseen.find((m) => m.text === text.trim());
    if (!msg) return;
    clearTimeout(msg.timer);
    unseen = unseen.filter((m) => m !== msg);
  }

  function forgetUnseen() {
    for (const msg of unseen) clearTimeout(msg.timer);
    unseen = [];
  }

  // 128 random bits in hex (crypto.randomUUID needs a secure context; a page on a LAN
  // address over http is not one).
  function messageId() {
    return Array.from(crypto.getRandomValues(new Uint8Array(16)),
      (b) => b.toString(16).padStart(2, '0')).join('');
  }

  function showChat() {
    const connected = document.body.dataset.connected === 'true';
    ui.chatText.disabled = !connected;
    ui.send.disabled = !connected || sending;
  }

  // ---- microphone ----

  async function toggleMic() {
    const r = room;
    if (!r) return;
    ui.mic.disabled = true;
    try {
      await r.localParticipant.setMicrophoneEnabled(!r.localParticipant.isMicrophoneEnabled);
    } catch (err) {
      showError(micError(err));
    } finally {
      ui.mic.disabled = room !== r;
      showMic();
    }
  }

  function showMic() {
    const on = !!room && room.localParticipant.isMicrophoneEnabled;
    ui.mic.textContent = on ? 'Mic on' : 'Mic off';
    ui.mic.setAttribute('aria-pressed', String(on));
    ui.mic.dataset.on = String(on);
  }

  function micError(err) {
    const name = err && err.name;
    if (name === 'NotAllowedError') return 'Microphone blocked: allow it for this page, then click the mic button.';
    if (name === 'NotFoundError') return 'No microphone found.';
    if (name === 'NotReadableError') return 'The microphone is in use by another program.';
    return `Microphone: ${err && err.message ? err.message : err}`;
  }

  // ---- levels and latency ----

  // The mic's MediaStreamTrack, or null while muted. Muting may stop the track and unmuting
  // start a new one, so the meter follows whatever the publication holds now.
  function micTrack() {
    const pub = room && room.localParticipant.getTrackPublication(LK.Track.Source.Microphone);
    return pub && pub.track && !pub.isMuted ? pub.track.mediaStreamTrack : null;
  }

  function level(key, mst) {
    let m = meters[key];
    if (!m || m.mst !== mst) {
      if (m) m.source.disconnect();
      m = mst ? makeMeter(mst) : undefined;
      if (m) meters[key] = m; else delete meters[key];
    }
    if (!m) return -Infinity;
    m.analyser.getFloatTimeDomainData(m.buf);
    let sum = 0;
    for (const v of m.buf) sum += v * v;
    return sum > 0 ? 10 * Math.log10(sum / m.buf.length) : -Infinity;
  }

  function makeMeter(mst) {
    const source = audioCtx.createMediaStreamSource(new MediaStream([mst]));
    const analyser = audioCtx.createAnalyser();
    analyser.fftSize = 1024; // ~21 ms at 48 kHz: about one poll period of audio
    source.connect(analyser); // not to the speakers: the <audio> element plays the agent
    return { mst, source, analyser, buf: new Float32Array(analyser.fftSize) };
  }

  function sample() {
    const now = performance.now();
    const mic = level('mic', micTrack());
    ui.level.value = Math.min(1, Math.max(0, 1 - mic / METER_FLOOR_DBFS));
    if (mic > USER_SPEECH_DBFS) lastSpeechAt = now;
    const agent = level('agent', agentTrack && agentTrack.mediaStreamTrack);
    if (pending && !pending.heard && agent > AGENT_AUDIO_DBFS) { pending.heard = true; mark(2, now); }
  }

  // A turn starts when the agent starts thinking; its latency runs from the last moment the
  // user's mic was loud before that (or from Send, for a typed message) to the agent's state
  // "speaking" and to its first sound. Both ends are clocked here, so the figures include the
  // network both ways. Turns the agent starts on its own (the greeting, an idle re-prompt)
  // follow nothing of the user's: they get no row.
  function startTurn(now) {
    finishTurn();
    const from = Math.max(lastSpeechAt, lastSentAt);
    if (from <= lastTurnAt) { lastTurnAt = now; return; }
    const row = ui.latency.insertRow();
    row.dataset.turn = String(++turns);
    if (lastSentAt > lastSpeechAt) row.dataset.typed = 'true';
    for (const text of [String(turns), '…', '…']) row.insertCell().textContent = text;
    pending = { speechEnd: from, row, spoke: false, heard: false };
    lastTurnAt = now;
  }

  function mark(column, now) {
    const cell = pending.row.cells[column];
    const ms = Math.round(now - pending.speechEnd);
    cell.textContent = `${ms} ms`;
    pending.row.dataset[column === 1 ? 'stateMs' : 'audioMs'] = String(ms);
  }

  function finishTurn() {
    if (!pending) return;
    for (const cell of [...pending.row.cells].slice(1)) if (cell.textContent === '…') cell.textContent = '—';
    pending = null;
  }

  function showState(state) {
    const prev = agentState;
    agentState = state || '';
    ui.state.textContent = agentState || 'not here';
    ui.state.dataset.state = agentState || 'absent';
    if (agentState === prev) return;
    const now = performance.now();
    if (agentState === 'thinking') startTurn(now);
    else if (agentState === 'speaking' && pending && !pending.spoke) { pending.spoke = true; mark(1, now); }
    else if (agentState !== 'speaking') finishTurn();
  }

  // ---- transcripts ----

  // Each stream carries a segment's whole text so far (read in chunks); a later stream of the
  // same segment replaces it. Only the newest stream of a segment may write, so a slow older
  // stream cannot overwrite a newer one, and nothing replaces a final.
  async function onTranscript(reader, info) {
    // Users may send text streams too (they can type): only the agent's word counts. It sends
    // both sides, the user's under the user's own identity, which livekit-server lets no one
    // but an agent or the user claim; anything else in the room is dropped unread.
    const speaker = speakerOf(info.identity);
    if (!speaker) {
      reader[Symbol.asyncIterator]().return().catch(() => {});
      return;
    }
    const attrs = reader.info.attributes || {};
    const id = attrs['lk.segment_id'] || reader.info.id;
    const final = attrs['lk.transcription_final'] === 'true';
    let seg = segments.get(id);
    if (!seg) {
      const el = document.createElement('p');
      el.dataset.speaker = speaker;
      el.dataset.identity = info.identity;
      el.dataset.segment = id;
      el.dataset.final = 'false';
      ui.transcript.appendChild(el);
      seg = { el, seq: 0, final: false };
      segments.set(id, seg);
    }
    if (seg.final) return;
    const seq = ++seg.seq;
    let text = '';
    try {
      for await (const chunk of reader) { // each chunk is a delta in livekit-client 2.23
        text += chunk;
        if (seq === seg.seq) render(seg, text, false);
      }
    } catch (err) {
      console.warn('transcript stream broke off', err);
      return;
    }
    if (seq === seg.seq) render(seg, text, final);
  }

  function render(seg, text, final) {
    const stick = ui.transcript.scrollTop + ui.transcript.clientHeight >= ui.transcript.scrollHeight - 4;
    seg.el.textContent = text;
    seg.el.dataset.final = String(final);
    seg.final = final;
    if (final && seg.el.dataset.speaker === 'user') seen(text);
    if (stick) ui.transcript.scrollTop = ui.transcript.scrollHeight;
  }

  // Whose words a transcript stream carries: the agent's, the user's own (sent by the agent on
  // the user's behalf), another person's in a meeting (labelled with their identity: only they
  // or the agent can send under it; shown only once the agent says everyone is heard, so in a
  // one-user room nobody else can put words on this page), or nobody's we show ('').
  function speakerOf(identity) {
    if (identity === AGENT) return 'agent';
    if (identity && identity === room.localParticipant.identity) return 'user';
    const agent = [...room.remoteParticipants.values()].find((p) => p.identity === AGENT);
    const meeting = agent && agent.attributes[MEETING_ATTR] === 'true';
    return meeting && identity && room.remoteParticipants.has(identity) ? 'other' : '';
  }

  // ---- page state ----

  function setPhase(phase, status) {
    document.body.dataset.phase = phase; // idle, connecting, connected, reconnecting
    document.body.dataset.connected = String(phase === 'connected');
    ui.join.disabled = phase !== 'idle';
    ui.leave.disabled = phase === 'idle';
    ui.mic.disabled = phase !== 'connected';
    ui.room.disabled = ui.name.disabled = phase !== 'idle';
    ui.status.textContent = status;
    showChat();
  }

  function showError(err) {
    ui.error.textContent = typeof err === 'string' ? err : (err && err.message) || String(err);
    ui.error.hidden = false;
  }

  function randomHex(bytes) {
    return Array.from(crypto.getRandomValues(new Uint8Array(bytes)),
                      (b) => b.toString(16).padStart(2, '0')).join('');
  }

  function clearError() { ui.error.textContent = ''; ui.error.hidden = true; }

  function boot() {
    const query = new URLSearchParams(location.search);
    // A room of one's own unless a link names one: a guessable default ("demo") would put
    // strangers in one room. 64 random bits, from the browser's CSPRNG.
    ui.room.value = query.get('room') || `room-${randomHex(8)}`;
    if (query.get('name')) ui.name.value = query.get('name');
    setPhase('idle', 'not connected');
    if (!LK) {
      ui.join.disabled = true;
      showError('livekit-client did not load (/vendor/livekit-client.umd.js).');
      return;
    }
    LK.setLogLevel(query.has('debug') ? 'debug' : 'warn'); // the SDK's info lines are noise
    if (!LK.isBrowserSupported()) showError('This browser lacks the WebRTC support LiveKit needs.');
    ui.form.addEventListener('submit', (e) => { e.preventDefault(); join(); });
    ui.leave.addEventListener('click', leave);
    ui.mic.addEventListener('click', toggleMic);
    ui.chat.addEventListener('submit', (e) => { e.preventDefault(); sendChat(); }); // Enter too
    ui.startAudio.addEventListener('click', () => {
      const r = room; // must be called right in the click, the one gesture browsers accept
      if (r) r.startAudio().then(() => { if (room === r) ui.startAudio.hidden = r.canPlaybackAudio; }, showError);
    });
    // Leave at once rather than have the agent wait for a timeout.
    window.addEventListener('pagehide', () => { if (room) room.disconnect(); });
  }

  boot();
})();
