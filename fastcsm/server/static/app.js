/* fastcsm page: speak a line, pick or create a voice, hold a live conversation.
 *
 * Audio arrives as raw PCM (16-bit little-endian mono, 24 kHz) from POST /v1/audio/speech
 * (response_format "pcm") or as binary WebSocket messages from /v1/conversations. Each piece
 * is converted to float32 and scheduled on the AudioContext clock right after the previous
 * one, so playback starts with the first chunk and has no gaps while the network keeps up.
 *
 * Everything the tests assert on is kept in `window.fastcsm` (counters, audio clock, last
 * error), so a test reads numbers rather than pixels.
 */
"use strict";

(() => {
  const SAMPLE_RATE = 24000;     // Mimi's rate; the server's pcm format
  const START_LEAD_S = 0.06;     // head start for the first chunk, absorbs network jitter
  const MAX_LEAD_S = 0.5;        // the head start doubles after each underrun, up to this
  const KEY_STORAGE = "fastcsm.apiKey";
  const BUILTIN_SPEAKERS = ["0", "1"];

  const $ = (id) => document.getElementById(id);

  // -- observable state (read by tests and by the figures) -------------------------------------
  const stats = {
    sampleRate: SAMPLE_RATE,
    requests: 0,           // utterances started (HTTP or WebSocket)
    chunksReceived: 0,     // audio pieces received for the current utterance
    bytesReceived: 0,
    samplesReceived: 0,
    samplesScheduled: 0,   // samples handed to AudioBufferSourceNodes
    sourcesScheduled: 0,
    underruns: 0,          // times a chunk came after the previous one had finished playing
    leadSeconds: 0.06,     // head start given to a chunk after an underrun (grows with each)
    clockStart: null,      // AudioContext time the utterance starts playing
    clockEnd: null,        // AudioContext time the last scheduled sample ends
    firstAudioMs: null,    // request sent -> first audio byte, ms
    rtf: null,             // real-time factor: generation wall time / audio duration (lower is better)
    audioSeconds: 0,
    playing: false,        // sources are scheduled and not all finished
    streaming: false,      // audio is still arriving
    done: false,           // the last utterance finished arriving (fully or interrupted)
    interrupted: false,
    stoppedAt: null,       // AudioContext time playback was cut by an interrupt
    lastError: null,       // text of the last error shown
    errors: [],
    voices: [],            // names the server listed
    mode: "single",
    conversation: { connected: false, turns: [], events: [] },
    utterances: [],        // summary of each finished utterance
    audioContextState: null,
    currentTime: () => (player.ctx ? player.ctx.currentTime : 0),
    outputPeak: () => player.outputPeak(),
    activeSources: () => player.sources.size,
  };
  window.fastcsm = stats;

  // -- errors ----------------------------------------------------------------------------------
  function showError(message) {
    stats.lastError = message;
    stats.errors.push(message);
    $("error-text").textContent = message;
    $("error").hidden = false;
  }
  function clearError() {
    $("error").hidden = true;
    $("error-text").textContent = "";
  }
  $("error-close").addEventListener("click", clearError);

  /* The server's own words for a refusal: OpenAI-style {"error": {"message"}}, FastAPI-style
   * {"detail": ...}, or plain text. */
  function messageFrom(body, status) {
    let text = (body || "").trim();
    try {
      const j = JSON.parse(text);
      const e = j.error !== undefined ? j.error : j.detail !== undefined ? j.detail : j.message;
      if (typeof e === "string") text = e;
      else if (e && typeof e.message === "string") text = e.message;
      else if (Array.isArray(e)) text = e.map((d) => (d.loc ? d.loc.join(".") + ": " : "") + (d.msg || JSON.stringify(d))).join("; ");
      else if (e !== undefined) text = JSON.stringify(e);
    } catch (_) { /* not JSON: keep the text */ }
    return `${status}: ${text || "the server refused the request"}`;
  }
  async function refusal(res) {
    let body = "";
    try { body = await res.text(); } catch (_) { /* body unreadable */ }
    let msg = messageFrom(body, res.status);
    const retry = res.headers.get("Retry-After");
    if (retry) msg += ` (retry after ${retry} s)`;
    return msg;
  }

  // -- API key ---------------------------------------------------------------------------------
  function apiKey() { return localStorage.getItem(KEY_STORAGE) || ""; }
  function authHeaders(extra = {}) {
    const key = apiKey();
    return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
  }
  $("api-key").value = apiKey();
  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const key = $("api-key").value.trim();
    if (key) localStorage.setItem(KEY_STORAGE, key); else localStorage.removeItem(KEY_STORAGE);
    clearError();
    loadInfo();
    loadVoices();
  });

  // -- playback --------------------------------------------------------------------------------
  /* Schedules float32 chunks back to back on one AudioContext. */
  class Player {
    constructor() {
      this.ctx = null;
      this.sources = new Set();
      this.next = 0;
      this.lead = START_LEAD_S;
      this.onIdle = null;
    }
    context() {
      if (!this.ctx) {
        try {
          this.ctx = new AudioContext({ sampleRate: SAMPLE_RATE, latencyHint: "interactive" });
        } catch (_) {
          this.ctx = new AudioContext({ latencyHint: "interactive" });  // browser resamples
        }
        this.ctx.onstatechange = () => { stats.audioContextState = this.ctx.state; };
        // Everything played passes one analyser, so the page (and its tests) can tell sound from silence.
        this.out = this.ctx.createAnalyser();
        this.out.fftSize = 2048;
        this.out.connect(this.ctx.destination);
        this.probe = new Float32Array(this.out.fftSize);
        stats.audioContextState = this.ctx.state;
      }
      if (this.ctx.state === "suspended") this.ctx.resume().catch(() => {});
      return this.ctx;
    }
    begin() {
      this.stop();
      this.next = 0;
      this.lead = START_LEAD_S;
      stats.leadSeconds = this.lead;
    }
    push(samples, rate) {
      const ctx = this.context();
      const buffer = ctx.createBuffer(1, samples.length, rate);
      buffer.copyToChannel(samples, 0);
      const src = ctx.createBufferSource();
      src.buffer = buffer;
      src.connect(this.out);
      const now = ctx.currentTime;
      if (this.next < now + 0.005) {
        // Late (or first): start after a head start. A stream that keeps arriving late gets a
        // longer one, trading a little latency for playback without stutter.
        if (this.next > 0) {
          stats.underruns += 1;
          this.lead = Math.min(MAX_LEAD_S, this.lead * 2);
          stats.leadSeconds = this.lead;
        }
        this.next = now + this.lead;
      }
      src.start(this.next);
      if (stats.clockStart === null) stats.clockStart = this.next;
      this.next += samples.length / rate;
      stats.clockEnd = this.next;
      stats.samplesScheduled += samples.length;
      stats.sourcesScheduled += 1;
      stats.playing = true;
      this.sources.add(src);
      src.onended = () => {
        this.sources.delete(src);
        if (this.sources.size === 0 && !stats.streaming) {
          stats.playing = false;
          if (this.onIdle) this.onIdle();
        }
      };
    }
    /* Peak of the last ~85 ms that reached the speakers (0 when silent). */
    outputPeak() {
      if (!this.out) return 0;
      this.out.getFloatTimeDomainData(this.probe);
      let peak = 0;
      for (const v of this.probe) peak = Math.max(peak, Math.abs(v));
      return peak;
    }
    stop() {
      for (const src of this.sources) {
        src.onended = null;
        try { src.stop(); } catch (_) { /* not started yet */ }
      }
      const had = this.sources.size > 0;
      this.sources.clear();
      stats.playing = false;
      return had;
    }
  }
  const player = new Player();

  /* Turns byte pieces of 16-bit little-endian PCM into float32, carrying an odd byte over. */
  class PcmDecoder {
    constructor() { this.carry = null; }
    decode(bytes) {
      if (this.carry !== null) {
        const joined = new Uint8Array(bytes.length + 1);
        joined[0] = this.carry;
        joined.set(bytes, 1);
        bytes = joined;
        this.carry = null;
      }
      if (bytes.length % 2) {
        this.carry = bytes[bytes.length - 1];
        bytes = bytes.subarray(0, bytes.length - 1);
      }
      const n = bytes.length / 2;
      const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.length);
      const out = new Float32Array(n);
      for (let i = 0; i < n; i++) out[i] = view.getInt16(2 * i, true) / 32768;
      return out;
    }
  }

  // -- one utterance: figures + waveform + playback ------------------------------------------
  let utter = null;  // { t0, tFirst, rate, pcm, pieces: Float32Array[], total }

  function beginUtterance(via, rate = SAMPLE_RATE) {
    player.begin();
    player.context();
    Object.assign(stats, {
      chunksReceived: 0, bytesReceived: 0, samplesReceived: 0, samplesScheduled: 0, sourcesScheduled: 0,
      underruns: 0, clockStart: null, clockEnd: null, firstAudioMs: null, rtf: null, audioSeconds: 0,
      streaming: true, done: false, interrupted: false, stoppedAt: null, playing: false,
    });
    stats.requests += 1;
    $("save-wav").disabled = true;
    utter = { via, t0: performance.now(), tFirst: null, tEnd: null, rate, pcm: new PcmDecoder(), pieces: [], total: 0 };
    setBusy(true);
    updateFigures();
    drawWave();
  }

  function audioBytes(bytes) {
    if (!utter) return;
    const samples = utter.pcm.decode(bytes);
    stats.bytesReceived += bytes.length;
    if (samples.length === 0) return;
    if (utter.tFirst === null) {
      utter.tFirst = performance.now();
      stats.firstAudioMs = utter.tFirst - utter.t0;
    }
    stats.chunksReceived += 1;
    stats.samplesReceived += samples.length;
    stats.audioSeconds = stats.samplesReceived / utter.rate;
    stats.rtf = (performance.now() - utter.t0) / 1000 / stats.audioSeconds;
    utter.pieces.push(samples);
    utter.total += samples.length;
    player.push(samples, utter.rate);
    scheduleDraw();
    updateFigures();
  }

  function endUtterance({ interrupted = false, error = null } = {}) {
    if (!utter) return;
    utter.tEnd = performance.now();
    stats.streaming = false;
    stats.done = true;
    stats.interrupted = interrupted;
    if (interrupted) {
      stats.stoppedAt = player.ctx ? player.ctx.currentTime : null;
      player.stop();
    }
    if (stats.audioSeconds > 0) stats.rtf = (utter.tEnd - utter.t0) / 1000 / stats.audioSeconds;
    stats.utterances.push({
      samples: stats.samplesReceived, chunks: stats.chunksReceived, firstAudioMs: stats.firstAudioMs,
      rtf: stats.rtf, interrupted, error,
    });
    if (player.sources.size === 0) stats.playing = false;
    setBusy(false);
    $("save-wav").disabled = stats.samplesReceived === 0;
    setSpeakState(error ? "failed" : interrupted ? "interrupted" : stats.playing ? "playing…" : "done");
    updateFigures();
    scheduleDraw();
  }
  player.onIdle = () => { if (stats.done) setSpeakState(stats.interrupted ? "interrupted" : "done"); };

  function fmt(x, digits) { return x === null || x === undefined || !isFinite(x) ? "—" : x.toFixed(digits); }
  function updateFigures() {
    $("fig-ttfa").textContent = stats.firstAudioMs === null ? "—" : `${Math.round(stats.firstAudioMs)} ms`;
    $("fig-rtf").textContent = fmt(stats.rtf, 2);
    $("fig-audio").textContent = stats.samplesReceived ? `${stats.audioSeconds.toFixed(2)} s` : "—";
    $("fig-chunks").textContent = stats.chunksReceived ? String(stats.chunksReceived) : "—";
  }

  // -- waveform --------------------------------------------------------------------------------
  const canvas = $("wave");
  let drawPending = false;
  function scheduleDraw() {
    if (drawPending) return;
    drawPending = true;
    requestAnimationFrame(() => { drawPending = false; drawWave(); if (stats.playing) scheduleDraw(); });
  }
  /* One bar per few pixels: peak (light) with RMS (solid) inside it; what has played so far is
   * drawn in the accent colour, what is still ahead in a paler one. */
  function drawWave() {
    const dpr = window.devicePixelRatio || 1;
    const w = Math.max(1, Math.round(canvas.clientWidth * dpr));
    const h = Math.max(1, Math.round(canvas.clientHeight * dpr));
    if (canvas.width !== w || canvas.height !== h) { canvas.width = w; canvas.height = h; }
    const g = canvas.getContext("2d");
    const css = getComputedStyle(document.documentElement);
    const mid = Math.floor(h / 2);
    g.clearRect(0, 0, w, h);
    g.fillStyle = css.getPropertyValue("--line").trim() || "#ddd";
    g.fillRect(0, mid, w, Math.max(1, Math.round(dpr)));
    if (!utter || utter.total === 0) return;
    // The axis spans the longer of what arrived and 2 s, so a short line doesn't fill it all.
    const span = Math.max(utter.total, 2 * utter.rate);
    const bar = Math.max(2, Math.round(3 * dpr)), gap = Math.max(1, Math.round(dpr));
    const perBar = span * (bar + gap) / w;
    const played = stats.clockStart === null || !player.ctx ? 0
      : Math.max(0, Math.min(utter.total, (player.ctx.currentTime - stats.clockStart) * utter.rate));
    const colour = css.getPropertyValue("--wave").trim() || "#4f46e5";
    const ahead = css.getPropertyValue("--wave-ahead").trim() || "#a5b4fc";
    const half = h / 2 - 2 * dpr;
    let piece = 0, offset = 0;
    for (let x = 0, k = 0; x < w; x += bar + gap, k++) {
      const start = Math.floor(k * perBar);
      const end = Math.min(utter.total, Math.floor((k + 1) * perBar));
      if (start >= utter.total) break;
      let peak = 0, sq = 0;
      for (let i = start; i < end; i++) {
        while (i - offset >= utter.pieces[piece].length) { offset += utter.pieces[piece].length; piece++; }
        const v = utter.pieces[piece][i - offset];
        const a = v < 0 ? -v : v;
        if (a > peak) peak = a;
        sq += v * v;
      }
      const rms = Math.sqrt(sq / Math.max(1, end - start));
      const fill = start < played ? colour : ahead;
      const ph = Math.max(dpr, peak * half), rh = Math.max(dpr, rms * half);
      g.globalAlpha = 0.35;
      g.fillStyle = fill;
      g.fillRect(x, mid - ph, bar, 2 * ph);
      g.globalAlpha = 1;
      g.fillRect(x, mid - rh, bar, 2 * rh);
    }
  }
  window.addEventListener("resize", scheduleDraw);

  // -- the length bound, in seconds beside its field -----------------------------------------
  /* The server bounds each sentence (each piece of the text) by it; empty means the server's own limit. */
  function showMaxLength() {
    const ms = parseInt($("max-ms").value, 10);
    const limit = stats.info && stats.info.max_audio_length_ms;
    $("max-ms-hint").textContent = isFinite(ms) && ms > 0 ? `${+(ms / 1000).toFixed(2)} s per sentence`
      : limit ? `the server's limit, ${+(limit / 1000).toFixed(2)} s per sentence` : "the server's limit";
  }
  $("max-ms").addEventListener("input", showMaxLength);

  // -- speaking over HTTP ----------------------------------------------------------------------
  let abort = null;

  function samplingFields() {
    const out = {};
    const t = parseFloat($("temperature").value);
    const k = parseInt($("topk").value, 10);
    const s = $("seed").value.trim();
    const m = parseInt($("max-ms").value, 10);
    if (isFinite(t)) out.temperature = t;
    if (isFinite(k)) out.topk = k;
    if (s !== "") out.seed = parseInt(s, 10);
    if (isFinite(m)) out.max_audio_length_ms = m;
    return out;
  }

  async function speakHttp(text) {
    const body = { model: "csm-1b", input: text, voice: $("voice").value || "0", response_format: "pcm", ...samplingFields() };
    abort = new AbortController();
    beginUtterance("http");
    setSpeakState("generating…");
    let res;
    try {
      res = await fetch("/v1/audio/speech", {
        method: "POST",
        headers: authHeaders({ "Content-Type": "application/json" }),
        body: JSON.stringify(body),
        signal: abort.signal,
      });
    } catch (err) {
      if (err.name === "AbortError") { endUtterance({ interrupted: true }); return; }
      const msg = `Could not reach the server: ${err.message}`;
      showError(msg);
      endUtterance({ error: msg });
      return;
    }
    if (!res.ok) {
      if (res.status === 401) askForKey();
      const msg = await refusal(res);
      showError(msg);
      endUtterance({ error: msg });
      return;
    }
    const rate = parseInt(res.headers.get("X-Fastcsm-Sample-Rate") || "", 10);
    if (rate > 0 && utter) utter.rate = rate;
    const reader = res.body.getReader();
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        if (value && value.length) audioBytes(value);
      }
      endUtterance();
    } catch (err) {
      if (err.name === "AbortError") { endUtterance({ interrupted: true }); return; }
      const msg = `The audio stream broke off: ${err.message}`;
      showError(msg);
      endUtterance({ error: msg });
    } finally {
      abort = null;
    }
  }

  // -- conversation over the WebSocket -------------------------------------------------------
  /* One live session: `add_turn` for the other party, `speak` for the model, `interrupt` to cut
   * it off. Audio comes as binary messages between `started` and `done`. */
  const THEM_SPEAKER = 1;

  class Conversation {
    constructor() {
      this.ws = null;
      this.opening = null;
      this.current = null;    // the model turn being spoken: its <li>
      this.rate = SAMPLE_RATE;
      this.dropping = false;  // interrupted: ignore audio until the server's `done`
      this.nextId = 0;
      this.mic = null;        // talk mode: { stream, ctx, node } while the microphone streams
      this.listening = false; // the server listens (its `configured` came): audio may be sent
      this.hearing = [];      // the <li> of each user turn heard and not yet transcribed
      this.assistant = false; // talk mode with the server's language model answering
    }
    url() {
      const u = new URL("/v1/conversations", location.href);
      u.protocol = location.protocol === "https:" ? "wss:" : "ws:";
      const key = apiKey();
      if (key) u.searchParams.set("api_key", key);  // browsers cannot set WebSocket headers
      return u.toString();
    }
    open() {
      if (this.ws && this.ws.readyState === WebSocket.OPEN) return Promise.resolve(this.ws);
      if (this.opening) return this.opening.promise;
      setConvState("connecting…", false);
      let resolve, reject;
      const promise = new Promise((res, rej) => { resolve = res; reject = rej; });
      promise.catch(() => {});
      this.opening = { promise, resolve, reject };
      const ws = new WebSocket(this.url());
      ws.binaryType = "arraybuffer";
      ws.onmessage = (ev) => this.message(ws, ev);
      ws.onerror = () => { /* onclose follows with the reason */ };
      ws.onclose = (ev) => {
        const wasOpen = this.ws === ws;
        this.ws = null;
        stats.conversation.connected = false;
        setConvState("not connected", false);
        if (stats.streaming && utter && utter.via === "ws") endUtterance({ error: "closed" });
        this.stopTalking();
        if (ev.code === 4401) askForKey();
        // The server says why in an error event before it closes; only a silent close gets a message here.
        if (ev.code !== 1000 && ev.code !== 1001 && !this.closing && !this.told) {
          const why = ev.reason || (wasOpen ? "the connection closed" : "the server refused the connection");
          showError(`Conversation closed (${ev.code}): ${why}`);
        }
        this.closing = false;
        this.told = false;
        if (this.opening) { this.opening.reject(new Error(ev.reason || `closed with code ${ev.code}`)); this.opening = null; }
      };
      return promise;
    }
    send(obj) {
      this.ws.send(JSON.stringify(obj));
    }
    async addTurn(text, audio = null) {
      try { await this.open(); } catch (_) { return; }
      const msg = { type: "add_turn", speaker: THEM_SPEAKER, text };
      if (audio) msg.audio = base64(new Uint8Array(await audio.arrayBuffer()));
      this.send(msg);
      addTurnItem("them", text, !!audio);
    }
    async speak(text) {
      try { await this.open(); } catch (_) { return; }
      beginUtterance("ws", this.rate);
      setSpeakState("generating…");
      this.dropping = false;
      this.current = addTurnItem("model", text);
      const id = `u${this.nextId++}`;
      this.current.dataset.id = id;
      const { max_audio_length_ms, temperature, topk, seed } = samplingFields();
      this.send({ type: "speak", id, text, voice: $("voice").value || "0", max_audio_length_ms, temperature, topk, seed });
    }
    /* Talk mode: the microphone (echo cancelled) streams to the server as 16-bit PCM at the audio
     * context's rate; the server finds the user's turns, transcribes them and adds them, with
     * their audio, to the conversation. A `configure` starts the conversation afresh. */
    async startTalking() {
      let ws;
      try { ws = await this.open(); } catch (_) { return; }
      let stream;
      try {
        stream = await navigator.mediaDevices.getUserMedia({
          audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true } });
      } catch (err) {
        showError(`The microphone is not available: ${err.message}`);
        return;
      }
      const ctx = new AudioContext();
      try {
        await ctx.audioWorklet.addModule("mic-worklet.js");
      } catch (err) {
        stream.getTracks().forEach((t) => t.stop());
        ctx.close();
        showError(`The microphone cannot be streamed: ${err.message}`);
        return;
      }
      const node = new AudioWorkletNode(ctx, "fastcsm-mic", { channelCount: 1, channelCountMode: "explicit" });
      const mute = ctx.createGain();  // the graph runs while it reaches the output; the mic is not played
      mute.gain.value = 0;
      ctx.createMediaStreamSource(stream).connect(node);
      node.connect(mute);
      mute.connect(ctx.destination);
      this.mic = { stream, ctx, node };
      stats.conversation.micRate = ctx.sampleRate;
      stats.conversation.micChunks = 0;
      node.port.onmessage = (ev) => {
        if (!this.listening || this.ws !== ws || ws.readyState !== WebSocket.OPEN) return;
        ws.send(ev.data);
        stats.conversation.micChunks++;
      };
      this.hearing = [];
      $("turns").replaceChildren();
      stats.conversation.turns = [];
      // With "the model answers", the server's language model replies to each turn heard (a server
      // without one refuses the configure, and its error shows).
      this.assistant = $("assistant").checked;
      this.send({ type: "configure", input_audio: { sample_rate: ctx.sampleRate }, barge_in: $("barge-in").checked,
                  assistant: this.assistant });
      $("talk").setAttribute("aria-pressed", "true");
      $("talk").textContent = "■ Stop talking";
      setTalkState("starting…");
    }
    stopTalking() {
      const mic = this.mic;
      this.mic = null;
      this.listening = false;
      if (!mic) return;
      mic.stream.getTracks().forEach((t) => t.stop());
      mic.ctx.close();
      $("talk").setAttribute("aria-pressed", "false");
      $("talk").textContent = "🎙 Talk";
      setTalkState("");
    }
    heard(msg) {
      switch (msg.type) {
        case "user_speech_started": {
          setTalkState("hearing you…");
          const li = addTurnItem("you", "…");
          li.classList.add("pending");
          this.hearing.push(li);
          // The server stops its line (barge_in); the audio already here stops too.
          if ($("barge-in").checked && stats.streaming && utter.via === "ws") this.interrupt();
          break;
        }
        case "user_speech_stopped":
          setTalkState("transcribing…");
          break;
        case "user_transcript_partial": {
          // The turn so far, transcribed at a pause: shown until the turn's final text comes.
          const li = this.hearing[this.hearing.length - 1];
          if (li) li.lastChild.textContent = `${msg.text}…`;
          break;
        }
        case "user_turn": {
          (stats.conversation.userTurns = stats.conversation.userTurns || []).push(msg);
          const li = this.hearing.shift();
          if (li) {
            li.classList.remove("pending");
            if (msg.added) li.lastChild.textContent = msg.text;
            else li.remove();
          }
          setTalkState(msg.added ? `heard ${(msg.audio_ms / 1000).toFixed(1)} s` : "nothing recognised");
          break;
        }
        default:
          break;
      }
    }
    /* Assistant mode: the model's reply to a turn heard starts; it plays as it comes, and its
     * words show as each piece's audio starts (`assistant_text`). */
    replying() {
      beginUtterance("ws", this.rate);
      setSpeakState("the model answers…");
      this.dropping = false;
      this.current = addTurnItem("model", "");
    }
    replyText(msg) {
      if (!this.current) return;
      const words = this.current.lastChild;
      words.textContent = words.textContent ? `${words.textContent} ${msg.text}` : msg.text;
      const turn = stats.conversation.turns.findLast((t) => t.who === "model");
      if (turn) turn.text = words.textContent;
      $("turns").scrollTop = $("turns").scrollHeight;
    }
    interrupt() {
      if (this.ws && this.ws.readyState === WebSocket.OPEN) this.send({ type: "interrupt" });
      this.dropping = true;
      if (this.current) this.current.classList.add("interrupted");
      endUtterance({ interrupted: true });
    }
    message(ws, ev) {
      if (typeof ev.data !== "string") {
        if (stats.streaming && utter.via === "ws" && !this.dropping) audioBytes(new Uint8Array(ev.data));
        else stats.conversation.droppedMessages = (stats.conversation.droppedMessages || 0) + 1;
        return;
      }
      let msg;
      try { msg = JSON.parse(ev.data); } catch (_) { return; }
      stats.conversation.events.push(msg);
      switch (msg.type) {
        case "ready":
          this.told = false;
          this.rate = msg.sample_rate || SAMPLE_RATE;
          this.ws = ws;
          stats.conversation.connected = true;
          setConvState("live", true);
          if (this.opening) { this.opening.resolve(ws); this.opening = null; }
          break;
        case "configured":
          this.listening = !!(this.mic && msg.input_audio);
          if (this.listening) setTalkState(`listening (${msg.input_audio.sample_rate} Hz)`);
          break;
        case "user_speech_started":
        case "user_speech_stopped":
        case "user_transcript_partial":
        case "user_turn":
          this.heard(msg);
          break;
        case "started":
          if (!this.current && this.assistant && this.listening) this.replying();
          if (this.current && (!msg.id || this.current.dataset.id === msg.id)) this.current.dataset.started = "1";
          break;
        case "assistant_text":
          this.replyText(msg);
          break;
        case "assistant_reply":
          (stats.conversation.replies = stats.conversation.replies || []).push(msg);
          break;
        case "first_audio":
          stats.conversation.serverFirstAudioMs = msg.ms;
          break;
        case "done":
          this.dropping = false;
          if (this.current) {
            if (msg.reason === "interrupted") this.current.classList.add("interrupted");
            this.current = null;
          }
          stats.conversation.lastDone = msg;
          if (stats.streaming) endUtterance({ interrupted: msg.reason === "interrupted" });
          break;
        case "context_dropped":
          addNote(`The context window was full: the ${msg.dropped_turns} oldest turn(s) were dropped.`);
          break;
        case "voice_unpinned":
          addNote(`The voice "${msg.voice}" was unpinned: the line did not fit beside it in the context window.`);
          break;
        case "error": {
          const text = msg.message || JSON.stringify(msg);
          this.told = true;
          showError(msg.code ? `${msg.code}: ${text}` : text);
          if (this.mic && !this.listening) this.stopTalking();  // its configure was refused
          // An error about the line being spoken (or one sent before it started) ends it.
          const cur = this.current;
          if (cur && (msg.id ? cur.dataset.id === msg.id : !cur.dataset.started)) {
            this.current.classList.add("failed");
            this.current = null;
            if (stats.streaming) endUtterance({ error: text });
          }
          break;
        }
        default:
          break;
      }
    }
    /* Forget every turn; the server keeps the connection and its settings. */
    reset() {
      if (stats.streaming) this.interrupt();
      if (this.ws && this.ws.readyState === WebSocket.OPEN) this.send({ type: "reset" });
      this.current = null;
      this.hearing = [];
      $("turns").replaceChildren();
      stats.conversation.turns = [];
    }
    close() {
      if (this.ws) { this.closing = true; this.ws.close(1000, "page closed the conversation"); }
    }
  }
  const conversation = new Conversation();

  function addTurnItem(who, text, withAudio = false) {
    const li = document.createElement("li");
    li.className = `turn ${who}`;
    const label = document.createElement("span");
    label.className = "who";
    label.textContent = who === "model" ? `model · ${$("voice").value || "0"}` : who === "you" ? "you · heard"
      : withAudio ? "them · with audio" : "them";
    li.append(label, document.createTextNode(text));
    $("turns").append(li);
    $("turns").scrollTop = $("turns").scrollHeight;  // scroll the list only, never the page
    stats.conversation.turns.push({ who, text, audio: withAudio });
    return li;
  }
  function addNote(text) {
    const li = document.createElement("li");
    li.className = "turn them muted small";
    li.textContent = text;
    $("turns").append(li);
  }
  function setTalkState(text) { $("talk-state").textContent = text; }
  function setConvState(text, live) {
    const el = $("conv-state");
    el.textContent = text;
    el.classList.toggle("live", live);
  }

  // -- controls --------------------------------------------------------------------------------
  function setBusy(busy) {
    $("speak").disabled = busy;
    $("interrupt").disabled = !busy && !stats.playing;
  }
  function setSpeakState(text) {
    $("speak-state").textContent = text;
    if (!stats.streaming && !stats.playing) $("interrupt").disabled = true;
  }

  $("speak").addEventListener("click", () => {
    const text = $("text").value.trim();
    if (!text) {
      showError("Type something to speak first.");
      // the status spoke of the last line ("interrupted", "done"); nothing is spoken now
      if (!stats.playing) setSpeakState("");
      $("text").focus();
      return;
    }
    clearError();
    if (stats.mode === "conversation") conversation.speak(text);
    else speakHttp(text);
  });
  $("text").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); $("speak").click(); }
  });

  function interrupt() {
    if (stats.streaming && utter.via === "ws") { conversation.interrupt(); return; }
    if (abort) abort.abort();
    if (stats.streaming) endUtterance({ interrupted: true });
    else if (player.stop()) {
      stats.interrupted = true;
      stats.stoppedAt = player.ctx.currentTime;
      setSpeakState("interrupted");
    }
    $("interrupt").disabled = true;
  }
  $("interrupt").addEventListener("click", interrupt);
  document.addEventListener("keydown", (ev) => { if (ev.key === "Escape" && !$("interrupt").disabled) interrupt(); });

  function setMode(mode) {
    stats.mode = mode;
    const conv = mode === "conversation";
    $("tab-single").setAttribute("aria-selected", String(!conv));
    $("tab-conversation").setAttribute("aria-selected", String(conv));
    $("tab-single").tabIndex = conv ? -1 : 0;
    $("tab-conversation").tabIndex = conv ? 0 : -1;
    $("speak-panel").setAttribute("aria-labelledby", conv ? "tab-conversation" : "tab-single");
    $("turns-box").hidden = !conv;
    $("text-label").textContent = conv ? "Model's next line" : "Text to speak";
    if (conv) conversation.open().catch(() => {});
    else {
      if (stats.streaming && utter.via === "ws") conversation.interrupt();
      conversation.close();
    }
  }
  $("tab-single").addEventListener("click", () => setMode("single"));
  $("tab-conversation").addEventListener("click", () => setMode("conversation"));
  // Tabs follow the ARIA pattern: arrow keys move between them, only the selected one is in the tab order.
  for (const tab of [$("tab-single"), $("tab-conversation")]) {
    tab.addEventListener("keydown", (ev) => {
      if (ev.key !== "ArrowLeft" && ev.key !== "ArrowRight") return;
      const other = tab.id === "tab-single" ? $("tab-conversation") : $("tab-single");
      other.click();
      other.focus();
    });
  }
  $("reset-conversation").addEventListener("click", () => conversation.reset());
  $("talk").addEventListener("click", () => (conversation.mic ? conversation.stopTalking() : conversation.startTalking()));
  $("add-turn").addEventListener("click", () => {
    const text = $("their-line").value.trim();
    if (!text) return;
    conversation.addTurn(text, theirAudio);
    theirAudio = null;
    $("their-audio").textContent = "";
    $("their-line").value = "";
    $("their-line").focus();
  });
  $("their-line").addEventListener("keydown", (ev) => { if (ev.key === "Enter") { ev.preventDefault(); $("add-turn").click(); } });

  // -- voices ----------------------------------------------------------------------------------
  function voiceName(v) { return typeof v === "string" ? v : v.name || v.id; }

  async function loadVoices(select) {
    let res;
    try {
      res = await fetch("/v1/voices", { headers: authHeaders() });
    } catch (err) {
      setServerState(false, "server unreachable");
      showError(`Could not reach the server: ${err.message}`);
      return;
    }
    if (!res.ok) {
      setServerState(false, res.status === 401 ? "API key needed" : `voices: ${res.status}`);
      if (res.status === 401) askForKey();
      showError(await refusal(res));
      return;
    }
    const body = await res.json();
    const list = Array.isArray(body) ? body : body.data || body.voices || [];
    stats.voices = list.map(voiceName);
    setServerState(true, "server ready");
    renderVoices(list, select);
  }

  function renderVoices(list, select) {
    const picker = $("voice");
    const keep = select || picker.value || "0";
    picker.replaceChildren();
    const builtin = document.createElement("optgroup");
    builtin.label = "Model speakers (no prompt)";
    for (const id of BUILTIN_SPEAKERS) builtin.append(new Option(`Speaker ${id}`, id));
    picker.append(builtin);
    if (list.length) {
      const mine = document.createElement("optgroup");
      mine.label = "Voices";
      for (const v of list) mine.append(new Option(voiceName(v), voiceName(v)));
      picker.append(mine);
    }
    picker.value = keep;
    if (picker.value !== keep) picker.value = "0";

    const ul = $("voices-list");
    ul.replaceChildren();
    for (const v of list) {
      const name = voiceName(v);
      const li = document.createElement("li");
      const label = document.createElement("span");
      label.textContent = name;
      if (v.duration_ms) {
        const meta = document.createElement("span");
        meta.className = "muted small";
        meta.textContent = ` · ${(v.duration_ms / 1000).toFixed(1)} s`;
        label.append(meta);
        label.title = `speaker ${v.speaker ?? "?"}: “${v.text || ""}”`;
      }
      const del = document.createElement("button");
      del.type = "button";
      del.textContent = "×";
      del.setAttribute("aria-label", `Delete voice ${name}`);
      del.addEventListener("click", () => deleteVoice(name));
      li.append(label, del);
      ul.append(li);
    }
  }

  async function deleteVoice(name) {
    if (!confirm(`Delete the voice “${name}”?`)) return;
    const res = await fetch(`/v1/voices/${encodeURIComponent(name)}`, { method: "DELETE", headers: authHeaders() });
    if (!res.ok) { showError(await refusal(res)); return; }
    loadVoices();
  }

  function setServerState(ok, text) {
    const el = $("server-state");
    el.textContent = text;
    el.classList.toggle("ok", ok);
    el.classList.toggle("bad", !ok);
  }

  // Audio picked for the new voice: a File from disk or a WAV made from a recording.
  let voiceAudio = null;

  $("voice-file").addEventListener("change", () => {
    const file = $("voice-file").files[0];
    if (!file) return;
    setVoiceAudio(file, file.name);
  });

  function setVoiceAudio(blob, label) {
    voiceAudio = { blob, name: label };
    $("audio-source").textContent = label;
    const preview = $("voice-preview");
    if (preview.src) URL.revokeObjectURL(preview.src);
    preview.src = URL.createObjectURL(blob);
    preview.hidden = false;
  }

  // Recording: MediaRecorder gives webm/opus; it is decoded here and sent as 16-bit WAV, a format
  // every server-side reader takes. One recorder at a time; its button toggles start and stop.
  let recorder = null;
  async function toggleRecording(button, onWav, onStart) {
    if (recorder && recorder.state === "recording") {
      if (recorder.button === button) recorder.stop();
      return;
    }
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false } });
    } catch (err) {
      showError(`The microphone is not available: ${err.message}`);
      return;
    }
    const parts = [];
    const idle = button.textContent;
    const rec = new MediaRecorder(stream);
    rec.button = button;
    rec.ondataavailable = (ev) => { if (ev.data.size) parts.push(ev.data); };
    rec.onstop = async () => {
      stream.getTracks().forEach((t) => t.stop());
      button.setAttribute("aria-pressed", "false");
      button.textContent = idle;
      try {
        const wav = await toWav(new Blob(parts, { type: rec.mimeType }));
        stats.recordedBytes = wav.size;
        onWav(wav, (wav.size - 44) / 2 / SAMPLE_RATE);
      } catch (err) {
        showError(`Could not read the recording: ${err.message}`);
      }
    };
    recorder = rec;
    rec.start();
    button.setAttribute("aria-pressed", "true");
    button.textContent = "■ Stop";
    if (onStart) onStart();
  }

  $("record").addEventListener("click", () => toggleRecording(
    $("record"),
    (wav, seconds) => setVoiceAudio(wav, `recording (${seconds.toFixed(1)} s)`),
    () => { $("audio-source").textContent = "recording…"; }));

  // Their line may carry their audio: it gives the other speaker a voice in the context.
  let theirAudio = null;
  $("record-their").addEventListener("click", () => toggleRecording(
    $("record-their"),
    (wav, seconds) => {
      theirAudio = wav;
      $("their-audio").textContent = `+ ${seconds.toFixed(1)} s of audio`;
    },
    () => { $("their-audio").textContent = "recording…"; }));

  function base64(bytes) {
    let bin = "";
    for (let i = 0; i < bytes.length; i += 0x8000) bin += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
    return btoa(bin);
  }

  async function toWav(blob) {
    const ctx = new OfflineAudioContext(1, 1, SAMPLE_RATE);
    const audio = await ctx.decodeAudioData(await blob.arrayBuffer());
    // Mix to mono and resample to 24 kHz by rendering through an offline context.
    const frames = Math.max(1, Math.ceil(audio.duration * SAMPLE_RATE));
    const offline = new OfflineAudioContext(1, frames, SAMPLE_RATE);
    const src = offline.createBufferSource();
    src.buffer = audio;
    src.connect(offline.destination);
    src.start();
    return wavBlob([(await offline.startRendering()).getChannelData(0)], SAMPLE_RATE);
  }

  /* 16-bit mono WAV of float32 pieces. */
  function wavBlob(pieces, rate) {
    const n = pieces.reduce((sum, p) => sum + p.length, 0);
    const out = new DataView(new ArrayBuffer(44 + n * 2));
    const text = (o, s) => { for (let i = 0; i < s.length; i++) out.setUint8(o + i, s.charCodeAt(i)); };
    text(0, "RIFF"); out.setUint32(4, 36 + n * 2, true); text(8, "WAVE");
    text(12, "fmt "); out.setUint32(16, 16, true); out.setUint16(20, 1, true); out.setUint16(22, 1, true);
    out.setUint32(24, rate, true); out.setUint32(28, rate * 2, true);
    out.setUint16(32, 2, true); out.setUint16(34, 16, true);
    text(36, "data"); out.setUint32(40, n * 2, true);
    let o = 44;
    for (const piece of pieces) {
      for (let i = 0; i < piece.length; i++, o += 2) {
        // ×32768 mirrors the decoding, so PCM from the server comes back bit for bit
        out.setInt16(o, Math.max(-32768, Math.min(32767, Math.round(piece[i] * 32768))), true);
      }
    }
    return new Blob([out.buffer], { type: "audio/wav" });
  }

  $("save-wav").addEventListener("click", () => {
    if (!utter || utter.total === 0) return;
    const a = document.createElement("a");
    a.href = URL.createObjectURL(wavBlob(utter.pieces, utter.rate));
    a.download = "fastcsm.wav";
    a.click();
    setTimeout(() => URL.revokeObjectURL(a.href), 10_000);
  });

  $("voice-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const name = $("voice-name").value.trim();
    const transcript = $("voice-text").value.trim();
    if (!voiceAudio) { showError("Choose an audio file or record one for the new voice."); return; }
    const form = new FormData();
    form.append("name", name);
    form.append("text", transcript);
    form.append("speaker", $("voice-speaker").value || "0");
    form.append("audio", voiceAudio.blob, voiceAudio.blob.name || "recording.wav");
    $("create-voice").disabled = true;
    $("voice-state").textContent = "encoding…";
    try {
      const res = await fetch("/v1/voices", { method: "POST", headers: authHeaders(), body: form });
      if (!res.ok) {
        const msg = await refusal(res);
        showError(msg);
        $("voice-state").textContent = "refused";
        return;
      }
      clearError();
      $("voice-form").reset();
      voiceAudio = null;
      $("voice-preview").hidden = true;
      $("audio-source").textContent = "no audio yet";
      $("voice-state").textContent = `created “${name}”`;
      stats.lastVoiceCreated = name;
      await loadVoices(name);
    } catch (err) {
      showError(`Could not reach the server: ${err.message}`);
      $("voice-state").textContent = "";
    } finally {
      $("create-voice").disabled = false;
    }
  });

  // -- server info: limits shown in the form, whether a key is needed ------------------------
  async function loadInfo() {
    let res;
    try {
      res = await fetch("/v1/info", { headers: authHeaders() });
    } catch (_) {
      return;  // loadVoices reports an unreachable server
    }
    if (res.status === 401) { askForKey(); return; }
    if (!res.ok) return;
    const info = await res.json();
    stats.info = info;
    if (info.max_input_chars) $("text").maxLength = info.max_input_chars;
    if (info.max_audio_length_ms) {
      $("max-ms").max = info.max_audio_length_ms;
      if (+$("max-ms").value > info.max_audio_length_ms) $("max-ms").value = info.max_audio_length_ms;
      showMaxLength();
    }
    // The sampling fields show the server's defaults and limits (its one table), unless edited.
    for (const [name, bounds] of Object.entries(info.options || {})) {
      const field = $(name);
      if (!field) continue;
      field.min = bounds.minimum;
      if (bounds.maximum !== null) field.max = bounds.maximum;
      if (field.value === "" && bounds.default !== null) field.value = bounds.default;
    }
    $("server-state").title = `${info.model} · ${info.slots} streams at once · ${info.sample_rate} Hz`;
  }
  function askForKey() {
    const box = document.querySelector(".apikey");
    box.open = true;
    $("api-key").focus();
  }

  // -- start -----------------------------------------------------------------------------------
  setMode("single");
  renderVoices([]);
  updateFigures();
  showMaxLength();
  drawWave();
  Promise.all([loadInfo(), loadVoices()]).then(() => { stats.ready = true; });
})();
