// The page's one WebSocket to the signaling server (PROTOCOL.md sections 1,
// 4 and 7): it authenticates, keeps the device list current, carries relay
// messages for the sessions, and reconnects when the network comes back.

import { decodeRelay, encodeRelay } from './frame.js';

/** Reconnect delays: 0.5 s doubling to 8 s. */
const FIRST_RETRY_MS = 500;
const MAX_RETRY_MS = 8000;
/** A `list_devices` goes out this often; it doubles as a liveness probe. */
const HEARTBEAT_MS = 10_000;
/** With nothing at all from the server for this long, the socket is dead. */
const DEAD_AFTER_MS = 25_000;
/** Browsers queue what the socket cannot send yet; past this we stop adding. */
const MAX_BUFFERED = 4 * 1024 * 1024;

/** How long to wait for `ice_servers` before starting without them. */
const ICE_WAIT_MS = 2000;

/** Errors after which trying again with the same token is pointless. */
const FATAL = new Set(['invalid_token', 'token_expired', 'rate_limited']);

/**
 * Events (an EventTarget; `detail` holds the data):
 * - `state`: `{ state }`: `connecting`, `online`, `offline` or `signed-out`,
 *   plus `message` when there is something to say;
 * - `ready`: `{ clientId, userId }` after each successful authentication (and
 *   the server's ICE servers) — a new client id means the worker sees a new
 *   client, so sessions start over;
 * - `ice`: the issued ICE servers were refreshed (`iceServers`);
 * - `devices`: `{ devices }` whenever the list or a status changes;
 * - `error`: `{ code, message }` for server errors that are not fatal.
 */
export class Connection extends EventTarget {
  /**
   * @param {string} url the server's `/ws` URL
   * @param {string} token an access token
   */
  constructor(url, token) {
    super();
    this.url = url;
    this.token = token;
    this.ws = null;
    this.state = 'connecting';
    this.clientId = null;
    this.userId = null;
    /** device id → `{ device_id, name, online, last_seen }` */
    this.devices = new Map();
    /** device id → a function taking relay frames from that device */
    this.routes = new Map();
    /** STUN/TURN servers issued by the server (TURN with fresh credentials). */
    this.iceServers = [];
    this.iceTimer = null;
    /** Set while `ready` waits for the first `ice_servers`. */
    this.readyTimer = null;
    this.retryMs = FIRST_RETRY_MS;
    this.lastHeard = 0;
    this.stopped = false;
    this.timer = setInterval(() => this.heartbeat(), HEARTBEAT_MS);
    this.retryTimer = null;
    window.addEventListener('online', () => this.reconnectNow());
  }

  start() {
    this.stopped = false;
    this.open();
  }

  /** Whether relay messages can go out now. */
  ready() {
    return this.ws !== null && this.ws.readyState === WebSocket.OPEN && this.clientId !== null;
  }

  open() {
    clearTimeout(this.retryTimer);
    this.setState('connecting');
    const ws = new WebSocket(this.url);
    ws.binaryType = 'arraybuffer';
    this.ws = ws;
    this.clientId = null;
    ws.onopen = () => {
      this.lastHeard = performance.now();
      ws.send(JSON.stringify({ type: 'authenticate', access_token: this.token }));
    };
    ws.onmessage = (event) => {
      if (ws !== this.ws) return;
      this.lastHeard = performance.now();
      if (typeof event.data === 'string') {
        this.onMessage(event.data);
      } else {
        this.onRelay(new Uint8Array(event.data));
      }
    };
    ws.onclose = () => {
      if (ws !== this.ws) return;
      this.ws = null;
      this.clientId = null;
      if (this.stopped) return;
      this.setState('offline', 'connection to the server lost; reconnecting');
      this.retryTimer = setTimeout(() => this.open(), this.retryMs * (0.75 + Math.random() / 2));
      this.retryMs = Math.min(this.retryMs * 2, MAX_RETRY_MS);
    };
  }

  /** Drops the socket and dials again at once (the network came back). */
  reconnectNow() {
    if (this.stopped) return;
    this.retryMs = FIRST_RETRY_MS;
    if (this.ws) {
      const ws = this.ws;
      this.ws = null;
      ws.close();
    }
    this.open();
  }

  heartbeat() {
    if (!this.ready()) return;
    if (performance.now() - this.lastHeard > DEAD_AFTER_MS) {
      this.reconnectNow();
      return;
    }
    this.sendJson({ type: 'list_devices' });
  }

  sendJson(message) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(message));
  }

  /** Sends a session frame to a device through the server; false if not now. */
  sendRelay(deviceId, frame) {
    if (!this.ready() || this.ws.bufferedAmount > MAX_BUFFERED) return false;
    this.ws.send(encodeRelay(deviceId, frame));
    return true;
  }

  onMessage(text) {
    let message;
    try {
      message = JSON.parse(text);
    } catch {
      console.warn('undecodable message from the server');
      return;
    }
    switch (message.type) {
      case 'authenticated':
        this.clientId = message.client_id;
        this.userId = message.user_id;
        this.retryMs = FIRST_RETRY_MS;
        this.setState('online');
        this.sendJson({ type: 'list_devices' });
        // Sessions start once the ICE servers are known (or soon anyway).
        this.sendJson({ type: 'get_ice_servers' });
        clearTimeout(this.readyTimer);
        this.readyTimer = setTimeout(() => this.markReady(), ICE_WAIT_MS);
        break;
      case 'ice_servers':
        this.iceServers = message.ice_servers;
        clearTimeout(this.iceTimer);
        // Fresh credentials at half their lifetime.
        this.iceTimer = setTimeout(
          () => this.sendJson({ type: 'get_ice_servers' }),
          Math.max(5, message.ttl_secs / 2) * 1000,
        );
        if (this.readyTimer !== null) this.markReady();
        else this.emit('ice', { iceServers: this.iceServers });
        break;
      case 'device_list':
        this.devices = new Map(message.devices.map((d) => [d.device_id, d]));
        this.emit('devices', { devices: [...this.devices.values()] });
        break;
      case 'device_status': {
        const device = this.devices.get(message.device_id);
        if (device) device.online = message.online;
        else this.sendJson({ type: 'list_devices' });
        this.emit('devices', { devices: [...this.devices.values()] });
        break;
      }
      case 'error':
        if (message.code === 'unknown_type' && this.readyTimer !== null) {
          // A server that issues no ICE servers.
          this.markReady();
        } else if (FATAL.has(message.code)) {
          this.stopped = true;
          this.setState('signed-out', message.message);
          this.ws?.close();
        } else {
          this.emit('error', { code: message.code, message: message.message });
        }
        break;
      default:
        // sync_data and anything newer: this client speaks the session layer.
        break;
    }
  }

  markReady() {
    clearTimeout(this.readyTimer);
    this.readyTimer = null;
    if (this.clientId !== null) this.emit('ready', { clientId: this.clientId, userId: this.userId });
  }

  onRelay(bytes) {
    const relay = decodeRelay(bytes);
    if (!relay) return;
    this.routes.get(relay.address)?.(relay.frame);
  }

  setState(state, message = '') {
    this.state = state;
    this.emit('state', { state, message });
  }

  emit(name, detail) {
    this.dispatchEvent(new CustomEvent(name, { detail }));
  }
}
