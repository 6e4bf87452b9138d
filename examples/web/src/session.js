// A session with one device (PROTOCOL.md sections 8 and 9): numbered byte
// streams carried by whichever link is live — the server's relay first, a
// WebRTC data channel once one opens — and moved between links, or onto a
// fresh connection after a reconnect, without losing or repeating a byte.

import {
  ACK,
  CONTROL_STREAM,
  DATA,
  FIN,
  PING,
  PONG,
  SKIP,
  decodeFrame,
  encodeMark,
  encodePing,
} from './frame.js';
import { ControlStream, InStream, OutStream } from './streams.js';

/** Resend what is unacknowledged after this long without progress. */
const RETRANSMIT_MS = 1000;
/** Unacknowledged bytes kept per outgoing stream. */
const STREAM_BUFFER = 4 * 1024 * 1024;
/** Terminal output is acknowledged at least this often (bytes). */
const ACK_EVERY = 16 * 1024;
/** After a working direct path fails, a new one is offered this much later. */
const REOFFER_MS = 3000;
/**
 * After an attempt fails before it ever worked, the next one starts this much
 * later, while the ICE timeout leaves time for it.
 */
const RETRY_MS = 1000;
/**
 * An attempt whose data channel has not opened this long after its offer is
 * given up for a fresh one: ICE may succeed and the DTLS or SCTP handshake
 * above it still hang, which no connection state reports.
 */
const ATTEMPT_MS = 10_000;
/** A data channel that does not drain for this long is given up. */
const STALL_MS = 2000;
/** How long an ICE attempt may take before the session settles on the relay. */
export const ICE_TIMEOUT_MS = 30_000;
/** Replies to requests wait at most this long. */
const REQUEST_TIMEOUT_MS = 120_000;
const TICK_MS = 250;
const PING_EVERY_MS = 2000;
const MAX_PINGS = 16;

/**
 * What a terminal view gives a session: where output, screens and the end
 * go. Output must be acknowledged with `consumed(end)` once shown — that is
 * the flow control.
 * @typedef {object} TerminalSink
 * @property {(bytes: Uint8Array, end: number) => void} output
 * @property {(snapshot: string) => void} redraw  reset the screen, then draw this
 * @property {(sessionId: string) => void} started
 * @property {(code: number) => void} exited
 * @property {(message: string) => void} failed
 */

/** One terminal on a session: stream N in both directions. */
export class TerminalStream {
  constructor(session, stream, sink, offset, resuming) {
    this.session = session;
    this.stream = stream;
    this.sink = sink;
    this.sessionId = null;
    this.output = new InStream(offset);
    /** Output handed to the sink, and what it has shown. */
    this.written = offset;
    this.shown = offset;
    /** The last offset acknowledged (-1: send one soon). */
    this.acked = -1;
    this.input = new OutStream(stream, STREAM_BUFFER);
    /** The terminal's input offset of `input`'s offset 0. */
    this.inputBase = 0;
    /**
     * Input held until `pty_resumed` says how much of it the terminal took:
     * `{ start, bytes }`, `start` being a terminal input offset.
     */
    this.carry = null;
    /** Waiting for `pty_resumed`: output is held in `early`. */
    this.resuming = resuming;
    this.early = [];
    this.fin = null;
    this.exit = null;
    this.attach = null;
    this.requestId = null;
  }

  /** Keystrokes (bytes) for the program. */
  write(bytes) {
    this.session.input(this, bytes);
  }

  resize(cols, rows) {
    if (this.sessionId) {
      this.session.queue({ type: 'pty_resize', session_id: this.sessionId, cols, rows });
    }
  }

  close() {
    if (this.sessionId) this.session.queue({ type: 'pty_close', session_id: this.sessionId });
  }

  /** The sink has shown output up to `end`. */
  consumed(end) {
    if (end <= this.shown) return;
    this.shown = end;
    this.session.ackOutput(this, false);
    this.session.finishIfDone(this);
  }
}

/**
 * Events: `path` (`{ path, local, remote }` — path is `relay`, `p2p` or
 * `turn`), `rtt` (`{ ms }`), `notice` (`{ message }`).
 */
export class Session extends EventTarget {
  /**
   * @param {import('./connection.js').Connection} connection
   * @param {string} deviceId
   * @param {{ iceServers?: RTCIceServer[], iceTimeoutMs?: number }} options
   */
  constructor(connection, deviceId, options = {}) {
    super();
    this.connection = connection;
    this.deviceId = deviceId;
    this.iceServers = options.iceServers ?? [];
    this.iceTimeoutMs = options.iceTimeoutMs ?? ICE_TIMEOUT_MS;
    this.control = new ControlStream(STREAM_BUFFER);
    /** stream number → TerminalStream */
    this.terminals = new Map();
    this.nextStream = 1;
    /** request id → { resolve, timer } */
    this.pending = new Map();
    this.nextRequest = 1;
    this.pings = new Map();
    this.rtt = null;
    this.pc = null;
    this.dc = null;
    /** The open data channel frames go on, or null for the relay. */
    this.channel = null;
    this.remoteDescribed = false;
    this.earlyCandidates = [];
    this.rtcDeadline = null;
    this.attemptUntil = null;
    this.reofferAt = null;
    this.stallSince = null;
    this.path = { path: 'relay', local: null, remote: null };
    this.clientId = null;
    this.closed = false;

    connection.routes.set(deviceId, (frame) => this.onFrame(frame));
    this.onReady = () => this.begin();
    connection.addEventListener('ready', this.onReady);
    /** Whether the device is online (null: not known yet). */
    this.deviceOnline = connection.devices.get(deviceId)?.online ?? null;
    this.onDeviceList = () => this.onDevices();
    connection.addEventListener('devices', this.onDeviceList);
    this.onIce = () => this.renew();
    connection.addEventListener('ice', this.onIce);
    this.ticker = setInterval(() => this.tick(), TICK_MS);
    this.pinger = setInterval(() => this.ping(), PING_EVERY_MS);
    if (connection.ready()) this.begin();
  }

  /** Opens a terminal; `options` as `attach_pty` (cols, rows, command…). */
  openTerminal(options, sink) {
    const stream = this.nextStream++;
    const terminal = new TerminalStream(this, stream, sink, 0, false);
    terminal.attach = { type: 'attach_pty', ...options, stream, flow_control: true };
    terminal.requestId = `attach-${stream}`;
    terminal.attach.request_id = terminal.requestId;
    this.terminals.set(stream, terminal);
    this.sendAttach(terminal);
    return terminal;
  }

  /**
   * Takes over a running terminal (after a reload: nothing on screen, so
   * from offset 0 — the worker replays what it still has or sends a screen).
   */
  resumeTerminal(sessionId, stream, sink) {
    this.nextStream = Math.max(this.nextStream, stream + 1);
    const terminal = new TerminalStream(this, stream, sink, 0, true);
    terminal.sessionId = sessionId;
    this.terminals.set(stream, terminal);
    this.sendResume(terminal, 0);
    return terminal;
  }

  /** Sends a request (execute, proxy_http, query_local); resolves with its reply. */
  request(payload) {
    const id = `web-${this.nextRequest++}`;
    const message = { ...payload };
    if (message.type === 'query_local') message.query_id = id;
    else message.request_id = id;
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        resolve({ type: 'error', code: 'timeout', message: 'no reply from the device' });
      }, REQUEST_TIMEOUT_MS);
      this.pending.set(id, { resolve, timer });
      if (!this.queue(message)) {
        this.settle(id, { type: 'error', code: 'busy', message: 'the session is backed up' });
      }
    });
  }

  close() {
    this.closed = true;
    clearInterval(this.ticker);
    clearInterval(this.pinger);
    this.connection.removeEventListener('ready', this.onReady);
    this.connection.removeEventListener('devices', this.onDeviceList);
    this.connection.removeEventListener('ice', this.onIce);
    this.connection.routes.delete(this.deviceId);
    this.closeRtc();
  }

  // ---- starting over -------------------------------------------------------

  /** The connection authenticated; as a new client if it reconnected. */
  begin() {
    const clientId = this.connection.clientId;
    if (this.closed || clientId === this.clientId) return;
    const first = this.clientId === null;
    this.clientId = clientId;
    if (first) {
      this.startRtc();
      this.flush();
      this.ping();
    } else {
      this.restart();
    }
  }

  /**
   * The device came back online: its worker reconnected to the server and
   * forgot every client it had, us included.
   */
  onDevices() {
    const online = this.connection.devices.get(this.deviceId)?.online ?? false;
    const back = online && this.deviceOnline === false;
    this.deviceOnline = online;
    if (back && this.clientId !== null) this.restart();
  }

  /**
   * The worker has no state for us (we are a new client, or it is a new
   * connection): every stream starts from 0 again, and terminals are resumed
   * from what they have shown.
   */
  restart() {
    this.closeRtc();
    this.channel = null;
    this.control = new ControlStream(STREAM_BUFFER);
    for (const [id] of this.pending) {
      this.settle(id, { type: 'error', code: 'connection_lost', message: 'the connection was lost' });
    }
    for (const terminal of this.terminals.values()) {
      const unsent = terminal.input.unacknowledged();
      const start = terminal.inputBase + terminal.input.acked;
      terminal.input = new OutStream(terminal.stream, STREAM_BUFFER);
      terminal.acked = -1;
      if (terminal.sessionId === null) {
        this.sendAttach(terminal);
        terminal.input.push(unsent);
      } else {
        const offset = terminal.resuming ? terminal.written : terminal.output.next;
        terminal.resuming = true;
        terminal.early = [];
        this.sendResume(terminal, offset);
        // Held until the worker says how much of it the terminal took (it
        // may have taken bytes whose acknowledgement was lost).
        terminal.carry ??= { start, bytes: unsent };
      }
    }
    this.setPath('relay');
    this.startRtc();
    this.flush();
    this.ping();
  }

  sendAttach(terminal) {
    this.queue(terminal.attach);
  }

  sendResume(terminal, offset) {
    terminal.output = new InStream(offset);
    terminal.written = offset;
    terminal.shown = Math.min(terminal.shown, offset);
    terminal.requestId = `resume-${terminal.stream}-${this.nextRequest++}`;
    this.queue({
      type: 'pty_resume',
      session_id: terminal.sessionId,
      offset,
      stream: terminal.stream,
      request_id: terminal.requestId,
    });
  }

  // ---- WebRTC ---------------------------------------------------------------

  async startRtc() {
    // A retry keeps the first attempt's deadline.
    const deadline = this.rtcDeadline;
    this.closeRtc();
    if (typeof RTCPeerConnection === 'undefined') return;
    let pc;
    try {
      const iceServers = [...this.iceServers, ...this.connection.iceServers];
      pc = new RTCPeerConnection({ iceServers });
    } catch (err) {
      this.notice(`WebRTC unavailable (${err.message}); staying on the relay`);
      return;
    }
    const dc = pc.createDataChannel('cocoon', { ordered: true });
    dc.binaryType = 'arraybuffer';
    this.pc = pc;
    this.dc = dc;
    this.remoteDescribed = false;
    this.earlyCandidates = [];
    this.rtcDeadline = deadline ?? performance.now() + this.iceTimeoutMs;
    this.attemptUntil = performance.now() + ATTEMPT_MS;
    pc.onicecandidate = (event) => {
      const c = event.candidate;
      if (pc !== this.pc || !c || !c.candidate) return;
      const message = {
        type: 'rtc_candidate',
        candidate: c.candidate,
        sdp_mid: c.sdpMid,
        sdp_mline_index: c.sdpMLineIndex,
      };
      if (c.usernameFragment) message.username_fragment = c.usernameFragment;
      this.queue(message);
    };
    pc.onconnectionstatechange = () => {
      if (pc !== this.pc) return;
      const state = pc.connectionState;
      if ((state === 'failed' || state === 'disconnected' || state === 'closed') && this.channel) {
        this.fallBack(`peer-to-peer connection ${state}`);
      } else if (state === 'failed' && !this.channel) {
        // Checks can fail early (a NAT mapping, a TURN allocation or the
        // peer's candidates not ready yet).
        this.retry('failed');
      }
    };
    dc.onopen = () => {
      if (pc !== this.pc) return;
      this.channel = dc;
      this.rtcDeadline = null;
      this.attemptUntil = null;
      this.stallSince = null;
      this.switchLink();
      this.updatePath();
      this.ping();
    };
    dc.onclose = () => {
      if (this.channel === dc) this.fallBack('data channel closed');
    };
    // Frames are the same whichever link brings them.
    dc.onmessage = (event) => this.onFrame(new Uint8Array(event.data));
    try {
      await pc.setLocalDescription(await pc.createOffer());
      if (pc !== this.pc) return;
      this.queue({ type: 'rtc_offer', sdp: pc.localDescription.sdp });
    } catch (err) {
      this.notice(`WebRTC offer failed (${err.message}); staying on the relay`);
      this.closeRtc();
    }
  }

  closeRtc() {
    const pc = this.pc;
    this.pc = null;
    this.dc = null;
    this.rtcDeadline = null;
    this.attemptUntil = null;
    if (pc) pc.close();
  }

  /**
   * Gives up an attempt that never opened a channel and offers the next one
   * soon, while the ICE timeout leaves time for it: the timeout is for trying.
   */
  retry(why) {
    this.attemptUntil = null;
    if (
      this.reofferAt === null &&
      this.rtcDeadline !== null &&
      performance.now() + 2 * RETRY_MS < this.rtcDeadline
    ) {
      this.notice(`peer-to-peer attempt ${why}; trying again`);
      this.reofferAt = performance.now() + RETRY_MS;
    }
  }

  /**
   * Fresh TURN credentials: a connection relayed by TURN is replaced now (an
   * ICE restart) rather than left to die when its allocation expires.
   */
  renew() {
    if (this.path.path !== 'turn') return;
    this.fallBack('TURN credentials refreshed');
    this.reofferAt = performance.now();
  }

  /** Moves back to the relay and offers a new connection a little later. */
  fallBack(reason) {
    this.notice(`${reason}; back to the relay`);
    this.channel = null;
    this.closeRtc();
    this.switchLink();
    this.setPath('relay');
    this.reofferAt = performance.now() + REOFFER_MS;
  }

  /** The link changed: everything unacknowledged goes again on the new one. */
  switchLink() {
    this.control.out.rewind();
    for (const terminal of this.terminals.values()) {
      terminal.input.rewind();
      terminal.acked = -1;
    }
    this.flush();
  }

  async onRtcAnswer(sdp) {
    const pc = this.pc;
    if (!pc) return;
    try {
      await pc.setRemoteDescription({ type: 'answer', sdp });
      this.remoteDescribed = true;
      for (const candidate of this.earlyCandidates.splice(0)) await pc.addIceCandidate(candidate);
    } catch (err) {
      this.notice(`WebRTC answer refused: ${err.message}`);
    }
  }

  async onRtcCandidate(message) {
    const candidate = {
      candidate: message.candidate,
      sdpMid: message.sdp_mid ?? null,
      sdpMLineIndex: message.sdp_mline_index ?? null,
    };
    if (message.username_fragment) candidate.usernameFragment = message.username_fragment;
    if (!this.pc) return;
    if (!this.remoteDescribed) {
      if (this.earlyCandidates.length < 64) this.earlyCandidates.push(candidate);
      return;
    }
    try {
      await this.pc.addIceCandidate(candidate);
    } catch (err) {
      console.warn('remote candidate refused', err);
    }
  }

  /** Reads which candidate pair carries the channel: P2P or TURN. */
  async updatePath() {
    const pc = this.pc;
    if (!pc || !this.channel) return;
    const pair = await selectedPair(pc);
    if (pc !== this.pc || !this.channel) return;
    const relayed = pair && (pair.local === 'relay' || pair.remote === 'relay');
    this.path = { path: relayed ? 'turn' : 'p2p', local: pair?.local ?? null, remote: pair?.remote ?? null };
    this.dispatchEvent(new CustomEvent('path', { detail: this.path }));
  }

  setPath(path) {
    this.path = { path, local: null, remote: null };
    this.dispatchEvent(new CustomEvent('path', { detail: this.path }));
  }

  /** The selected candidate pair of the live connection (for tests and the UI). */
  async candidatePair() {
    return this.pc && this.channel ? selectedPair(this.pc) : null;
  }

  // ---- sending ----------------------------------------------------------------

  /** Queues a control message; false when the control stream is backed up. */
  queue(message) {
    const ok = this.control.queue(message);
    this.flush();
    return ok;
  }

  input(terminal, bytes) {
    const carry = terminal.carry;
    const room = carry ? STREAM_BUFFER - carry.bytes.length : terminal.input.room();
    if (bytes.length > room) {
      this.notice('terminal input is backed up; keystrokes dropped');
      return;
    }
    if (carry) {
      carry.bytes = concat(carry.bytes, bytes);
    } else {
      terminal.input.push(bytes);
    }
    this.flush();
  }

  /** Sends one frame on the data channel when one is open, else the relay. */
  send(frame) {
    if (this.channel) {
      try {
        this.channel.send(frame);
        return;
      } catch (err) {
        this.fallBack(`data channel failed (${err.message})`);
      }
    }
    // Lost when the server is unreachable: the stream resends it.
    this.connection.sendRelay(this.deviceId, frame);
  }

  flush() {
    if (!this.connection.ready() && !this.channel) return;
    for (let frame; (frame = this.control.out.nextFrame()); ) this.send(frame);
    for (const terminal of this.terminals.values()) {
      for (let frame; (frame = terminal.input.nextFrame()); ) this.send(frame);
      this.ackOutput(terminal, false);
    }
  }

  /** Acknowledges what the terminal has shown, in steps of ACK_EVERY. */
  ackOutput(terminal, force) {
    if (terminal.resuming) return;
    const behind = terminal.shown - terminal.acked;
    const due = force || (behind > 0 && (behind >= ACK_EVERY || terminal.shown === terminal.written));
    if (!due) return;
    terminal.acked = terminal.shown;
    this.send(encodeMark(ACK, terminal.stream, terminal.shown));
  }

  ping() {
    if (!this.connection.ready() && !this.channel) return;
    const nonce = BigInt.asUintN(64, BigInt(Math.floor(Math.random() * 2 ** 53)));
    if (this.pings.size >= MAX_PINGS) this.pings.delete(this.pings.keys().next().value);
    this.pings.set(nonce, performance.now());
    this.send(encodePing(PING, nonce));
  }

  notice(message) {
    this.dispatchEvent(new CustomEvent('notice', { detail: { message } }));
  }

  tick() {
    const now = performance.now();
    if (this.rtcDeadline !== null && now >= this.rtcDeadline) {
      this.notice('no peer-to-peer path within the ICE timeout; staying on the relay');
      this.closeRtc();
    }
    if (!this.channel && this.attemptUntil !== null && now >= this.attemptUntil) {
      this.retry('stalled');
    }
    if (this.reofferAt !== null && now >= this.reofferAt) {
      this.reofferAt = null;
      this.startRtc();
    }
    if (this.channel) {
      // A channel whose buffer does not drain is as good as dead.
      if (this.channel.bufferedAmount > 0) {
        this.stallSince ??= { at: now, amount: this.channel.bufferedAmount };
        if (this.channel.bufferedAmount < this.stallSince.amount) {
          this.stallSince = { at: now, amount: this.channel.bufferedAmount };
        } else if (now - this.stallSince.at >= STALL_MS) {
          this.fallBack('data channel stalled');
        }
      } else {
        this.stallSince = null;
      }
    }
    this.control.out.resendIfStalled(RETRANSMIT_MS);
    for (const terminal of this.terminals.values()) terminal.input.resendIfStalled(RETRANSMIT_MS);
    this.flush();
  }

  // ---- receiving ----------------------------------------------------------------

  onFrame(bytes) {
    const frame = decodeFrame(bytes);
    if (!frame) return;
    switch (frame.kind) {
      case DATA:
        if (frame.stream === CONTROL_STREAM) {
          const { ack, messages } = this.control.receive(frame.offset, frame.bytes);
          this.send(ack);
          for (const message of messages) this.onControl(message);
        } else {
          this.onOutput(frame.stream, frame.offset, frame.bytes);
        }
        break;
      case ACK:
        if (frame.stream === CONTROL_STREAM) this.control.out.ack(frame.offset);
        else this.terminals.get(frame.stream)?.input.ack(frame.offset);
        break;
      case SKIP: {
        const terminal = this.terminals.get(frame.stream);
        if (terminal && frame.offset > terminal.output.next) {
          terminal.output.skipTo(frame.offset);
          // Nothing to show for the gap: count it as shown.
          if (terminal.written === terminal.shown) terminal.shown = frame.offset;
          terminal.written = frame.offset;
          this.ackOutput(terminal, true);
        }
        break;
      }
      case FIN: {
        const terminal = this.terminals.get(frame.stream);
        if (terminal) {
          terminal.fin = frame.offset;
          this.finishIfDone(terminal);
        }
        break;
      }
      case PING:
        this.send(encodePing(PONG, frame.nonce));
        break;
      case PONG: {
        const sent = this.pings.get(frame.nonce);
        if (sent !== undefined) {
          this.pings.delete(frame.nonce);
          this.rtt = performance.now() - sent;
          this.dispatchEvent(new CustomEvent('rtt', { detail: { ms: this.rtt } }));
        }
        break;
      }
    }
  }

  onOutput(stream, offset, bytes) {
    const terminal = this.terminals.get(stream);
    if (!terminal) return;
    const fresh = terminal.output.accept(offset, bytes);
    if (!fresh) {
      // A duplicate: the worker missed an ACK. Say again what we have.
      this.ackOutput(terminal, true);
      return;
    }
    const start = terminal.output.next - fresh.length;
    if (terminal.resuming) {
      terminal.early.push({ start, bytes: fresh.slice() });
      return;
    }
    this.show(terminal, fresh);
  }

  show(terminal, bytes) {
    terminal.written += bytes.length;
    terminal.sink.output(bytes, terminal.written);
  }

  onControl(message) {
    switch (message.type) {
      case 'rtc_answer':
        this.onRtcAnswer(message.sdp);
        return;
      case 'rtc_candidate':
        this.onRtcCandidate(message);
        return;
      case 'pty_created': {
        const terminal = this.terminals.get(message.stream);
        if (terminal) {
          terminal.sessionId = message.session_id;
          terminal.sink.started(message.session_id);
          this.flush();
        }
        return;
      }
      case 'pty_resumed':
        this.onResumed(message);
        return;
      case 'pty_exited': {
        const terminal = this.bySession(message.session_id);
        if (terminal) {
          terminal.exit = message.exit_code;
          this.finishIfDone(terminal);
        }
        return;
      }
      case 'error':
        if (message.request_id && this.pending.has(message.request_id)) {
          this.settle(message.request_id, message);
          return;
        }
        this.onTerminalError(message);
        return;
      default: {
        const id = message.request_id ?? message.query_id;
        if (id && this.pending.has(id)) this.settle(id, message);
      }
    }
  }

  /** An error about a terminal: its attach or resume failed, or it is gone. */
  onTerminalError(message) {
    const terminal =
      [...this.terminals.values()].find((t) => message.request_id && t.requestId === message.request_id) ??
      (message.session_id ? this.bySession(message.session_id) : null);
    if (!terminal) {
      this.notice(`${message.code}: ${message.message}`);
      return;
    }
    this.terminals.delete(terminal.stream);
    terminal.sink.failed(message.message ?? message.code);
  }

  onResumed(message) {
    const terminal = this.terminals.get(message.stream);
    if (!terminal || !terminal.resuming) return;
    terminal.resuming = false;
    terminal.sessionId = message.session_id;
    const taken = message.input_offset ?? null;
    const carry = terminal.carry;
    terminal.carry = null;
    if (carry) {
      // A worker that does not say gets everything unacknowledged again.
      const skip = Math.min(taken === null ? 0 : Math.max(0, taken - carry.start), carry.bytes.length);
      terminal.inputBase = carry.start + skip;
      terminal.input.push(carry.bytes.subarray(skip));
    } else {
      terminal.inputBase = taken ?? 0;
    }
    const from = message.offset;
    if (message.snapshot != null) {
      terminal.sink.redraw(message.snapshot);
    }
    if (from > terminal.written) {
      terminal.output.skipTo(from);
      terminal.written = from;
      terminal.shown = Math.max(terminal.shown, from);
    }
    for (const { start, bytes } of terminal.early.splice(0)) {
      const skip = terminal.written - start;
      if (skip < bytes.length && skip >= 0) this.show(terminal, bytes.subarray(skip));
    }
    terminal.sink.started(message.session_id);
    this.ackOutput(terminal, true);
    this.flush();
  }

  finishIfDone(terminal) {
    if (terminal.exit === null || terminal.fin === null || terminal.shown < terminal.fin) return;
    this.terminals.delete(terminal.stream);
    terminal.sink.exited(terminal.exit);
  }

  bySession(sessionId) {
    for (const terminal of this.terminals.values()) {
      if (terminal.sessionId === sessionId) return terminal;
    }
    return null;
  }

  settle(id, reply) {
    const pending = this.pending.get(id);
    if (!pending) return;
    this.pending.delete(id);
    clearTimeout(pending.timer);
    pending.resolve(reply);
  }
}

/** The candidate types of a connection's selected pair, from getStats(). */
async function selectedPair(pc) {
  const stats = await pc.getStats();
  let pairId = null;
  stats.forEach((report) => {
    if (report.type === 'transport' && report.selectedCandidatePairId) {
      pairId = report.selectedCandidatePairId;
    }
  });
  let pair = pairId ? stats.get(pairId) : null;
  if (!pair) {
    stats.forEach((report) => {
      if (report.type === 'candidate-pair' && report.state === 'succeeded' && report.nominated) {
        pair ??= report;
      }
    });
  }
  if (!pair) return null;
  return {
    state: pair.state,
    local: stats.get(pair.localCandidateId)?.candidateType ?? null,
    remote: stats.get(pair.remoteCandidateId)?.candidateType ?? null,
  };
}

/** `a` followed by `b`, as a new array. */
function concat(a, b) {
  const out = new Uint8Array(a.length + b.length);
  out.set(a);
  out.set(b, a.length);
  return out;
}
