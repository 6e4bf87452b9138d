// The page: sign in, devices, terminal tabs, the status line and the tools
// panel (run a command, open an HTTP service).

import '@xterm/xterm/css/xterm.css';
import './style.css';
import { Connection } from './connection.js';
import { Session } from './session.js';
import { TerminalTab } from './terminal.js';

const TOKEN_KEY = 'cocoon.token';
const TABS_KEY = 'cocoon.tabs';
const SETTINGS_KEY = 'cocoon.settings';

const $ = (selector) => document.querySelector(selector);

/**
 * Operator settings kept in this browser: `iceServers` (RTCIceServer list)
 * and `iceTimeoutMs`.
 */
function settings() {
  try {
    return JSON.parse(localStorage.getItem(SETTINGS_KEY) ?? '{}');
  } catch {
    return {};
  }
}

class App {
  constructor() {
    this.connection = null;
    /** device id → Session */
    this.sessions = new Map();
    /** TerminalTab[] in tab order */
    this.tabs = [];
    this.active = null;
    this.selected = null;
    this.restored = false;
    /** The latest notice for the status line, shown for a few seconds. */
    this.notice = '';
    this.noticeTimer = null;
  }

  start() {
    // The token arrives in the URL fragment (never sent to a server) or is
    // typed in; it stays in this tab's session storage only.
    const fragment = new URLSearchParams(location.hash.slice(1));
    if (fragment.get('token')) {
      sessionStorage.setItem(TOKEN_KEY, fragment.get('token'));
      history.replaceState(null, '', location.pathname + location.search);
    }
    $('#signin-form').addEventListener('submit', (event) => {
      event.preventDefault();
      const token = $('#signin-token').value.trim();
      if (!token) return;
      sessionStorage.setItem(TOKEN_KEY, token);
      $('#signin').hidden = true;
      this.connect(token);
    });
    $('#signout').addEventListener('click', () => this.signOut());
    $('#run-form').addEventListener('submit', (event) => {
      event.preventDefault();
      this.runCommand();
    });
    $('#proxy-form').addEventListener('submit', (event) => {
      event.preventDefault();
      this.openService();
    });
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) this.connect(token);
    else $('#signin').hidden = false;
  }

  connect(token) {
    const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
    const connection = new Connection(`${scheme}://${location.host}/ws`, token);
    this.connection = connection;
    connection.addEventListener('state', ({ detail }) => {
      if (detail.state === 'signed-out') {
        sessionStorage.removeItem(TOKEN_KEY);
        $('#signin').hidden = false;
        $('#signin-error').textContent = detail.message;
      }
      this.say(detail.message ?? '');
    });
    connection.addEventListener('ready', ({ detail }) => {
      $('#user').textContent = detail.userId;
      if (!this.restored) {
        this.restored = true;
        this.restoreTabs();
      }
    });
    connection.addEventListener('devices', () => {
      this.renderDevices();
      this.renderStatus();
    });
    connection.addEventListener('error', ({ detail }) => {
      this.say(`${detail.code}: ${detail.message}`);
    });
    connection.start();
  }

  signOut() {
    sessionStorage.removeItem(TOKEN_KEY);
    sessionStorage.removeItem(TABS_KEY);
    location.reload();
  }

  session(deviceId) {
    let session = this.sessions.get(deviceId);
    if (!session) {
      const { iceServers, iceTimeoutMs } = settings();
      session = new Session(this.connection, deviceId, { iceServers, iceTimeoutMs });
      session.addEventListener('path', () => this.renderStatus());
      session.addEventListener('rtt', () => this.renderStatus());
      session.addEventListener('notice', ({ detail }) => {
        this.say(detail.message);
      });
      this.sessions.set(deviceId, session);
    }
    return session;
  }

  deviceName(deviceId) {
    const device = this.connection.devices.get(deviceId);
    return device?.name || deviceId.slice(0, 8);
  }

  newTab(deviceId, command) {
    const tab = this.makeTab(deviceId);
    tab.open(this.session(deviceId), command);
    return tab;
  }

  makeTab(deviceId) {
    const same = this.tabs.filter((t) => t.deviceId === deviceId).length;
    const tab = new TerminalTab({
      parent: $('#terminals'),
      title: same ? `${this.deviceName(deviceId)} (${same + 1})` : this.deviceName(deviceId),
      onChange: () => {
        this.saveTabs();
        this.renderTabs();
        this.renderStatus();
      },
    });
    tab.deviceId = deviceId;
    this.tabs.push(tab);
    this.activate(tab);
    return tab;
  }

  /** After a reload: take over the sessions this browser tab had open. */
  restoreTabs() {
    let saved = [];
    try {
      saved = JSON.parse(sessionStorage.getItem(TABS_KEY) ?? '[]');
    } catch {
      saved = [];
    }
    for (const { device, sessionId, stream } of saved) {
      if (typeof device !== 'string' || typeof sessionId !== 'string' || !Number.isInteger(stream)) {
        continue;
      }
      const tab = this.makeTab(device);
      tab.resume(this.session(device), sessionId, stream);
    }
  }

  saveTabs() {
    const live = this.tabs
      .filter((t) => t.sessionId && (t.state === 'running' || t.state === 'starting'))
      .map((t) => ({ device: t.deviceId, sessionId: t.sessionId, stream: t.stream.stream }));
    sessionStorage.setItem(TABS_KEY, JSON.stringify(live));
  }

  activate(tab) {
    this.active = tab;
    if (tab) this.selected = tab.deviceId;
    for (const t of this.tabs) t.show(t === tab);
    this.renderTabs();
    this.renderStatus();
    this.renderDevices();
  }

  closeTab(tab) {
    tab.close();
    const at = this.tabs.indexOf(tab);
    this.tabs.splice(at, 1);
    this.saveTabs();
    if (this.active === tab) this.activate(this.tabs[Math.min(at, this.tabs.length - 1)] ?? null);
    else this.renderTabs();
  }

  renderDevices() {
    const list = $('#devices');
    list.replaceChildren();
    const devices = [...(this.connection?.devices.values() ?? [])];
    if (!this.selected && devices.length) {
      this.selected = (devices.find((d) => d.online) ?? devices[0]).device_id;
    }
    if (devices.length === 0) {
      const empty = document.createElement('li');
      empty.className = 'empty';
      empty.textContent = 'No devices yet. Start a worker with a setup token of yours.';
      list.appendChild(empty);
    }
    for (const device of devices) {
      const item = document.createElement('li');
      item.className = device.device_id === this.selected ? 'device selected' : 'device';
      item.dataset.device = device.device_id;
      const dot = document.createElement('span');
      dot.className = device.online ? 'dot online' : 'dot offline';
      dot.title = device.online ? 'online' : 'offline';
      const name = document.createElement('span');
      name.className = 'name';
      name.textContent = device.name || device.device_id.slice(0, 12);
      name.title = device.device_id;
      const open = document.createElement('button');
      open.className = 'open-terminal';
      open.textContent = '+ terminal';
      open.disabled = !device.online;
      open.addEventListener('click', (event) => {
        event.stopPropagation();
        this.newTab(device.device_id);
      });
      item.addEventListener('click', () => {
        this.selected = device.device_id;
        this.renderDevices();
      });
      item.append(dot, name, open);
      list.appendChild(item);
    }
    $('#tool-device').textContent = this.selected ? this.deviceName(this.selected) : 'no device';
  }

  renderTabs() {
    const bar = $('#tabs');
    bar.replaceChildren();
    for (const tab of this.tabs) {
      const item = document.createElement('div');
      item.className = `tab ${tab === this.active ? 'active' : ''} ${tab.state}`;
      item.setAttribute('role', 'tab');
      const label = document.createElement('span');
      label.textContent = tab.title;
      const close = document.createElement('button');
      close.className = 'close';
      close.textContent = '×';
      close.title = 'Close (ends the program)';
      close.addEventListener('click', (event) => {
        event.stopPropagation();
        this.closeTab(tab);
      });
      item.addEventListener('click', () => this.activate(tab));
      item.append(label, close);
      bar.appendChild(item);
    }
  }

  /** Shows a notice on the status line for 10 s. */
  say(message) {
    this.notice = message;
    clearTimeout(this.noticeTimer);
    this.noticeTimer = setTimeout(() => {
      this.notice = '';
      this.renderStatus();
    }, 10_000);
    this.renderStatus();
  }

  /** The status line: the active terminal's device, path and live RTT. */
  renderStatus() {
    const status = $('#status');
    const connection = this.connection;
    const tab = this.active;
    const parts = [];
    let path = 'none';
    if (connection && connection.state !== 'online') {
      parts.push(connection.state === 'connecting' ? 'Connecting…' : 'Offline — reconnecting');
    }
    if (tab) {
      const session = this.sessions.get(tab.deviceId);
      parts.push(tab.title);
      if (connection.devices.get(tab.deviceId)?.online === false) {
        parts.push('device offline — waiting for it');
      } else if (session) {
        path = session.path.path;
        const label = { relay: 'Relay (via the server)', p2p: 'P2P', turn: 'TURN' }[path];
        const pair = session.path.local ? ` ${session.path.local} ↔ ${session.path.remote}` : '';
        parts.push(`${label}${pair}`);
        if (session.rtt !== null) parts.push(`RTT ${session.rtt.toFixed(1)} ms`);
      }
      if (tab.state !== 'running') parts.push(tab.state);
    }
    if (this.notice) parts.push(this.notice);
    status.dataset.path = path;
    status.textContent = parts.join(' · ');
  }

  async runCommand() {
    const output = $('#run-output');
    const command = $('#run-command').value;
    if (!this.selected || !command.trim()) return;
    output.textContent = 'Running…';
    const reply = await this.session(this.selected).request({ type: 'execute', command, input: null });
    if (reply.type === 'execute_result') {
      const data = reply.data;
      const lines = [];
      if (data.stdout) lines.push(decodeField(data.stdout, data.stdout_encoding));
      if (data.stderr) lines.push(decodeField(data.stderr, data.stderr_encoding));
      lines.push(`[exit code ${data.exit_code ?? 'none'}${data.error ? `, ${data.error}` : ''}${data.truncated ? ', truncated' : ''}]`);
      output.textContent = lines.join('\n');
      output.dataset.exitCode = String(data.exit_code);
    } else {
      output.textContent = `${reply.code}: ${reply.message}`;
      output.dataset.exitCode = '';
    }
  }

  async openService() {
    const result = $('#proxy-result');
    const service = $('#proxy-service').value.trim();
    const path = $('#proxy-path').value.trim() || '/';
    if (!this.selected || !service) return;
    result.replaceChildren('Loading…');
    const reply = await this.session(this.selected).request({
      type: 'proxy_http',
      service_name: service,
      method: 'GET',
      path,
      headers: {},
      body: null,
    });
    if (reply.type !== 'proxy_result') {
      result.replaceChildren(`${reply.code}: ${reply.message}`);
      return;
    }
    const head = document.createElement('div');
    head.className = 'proxy-status';
    head.textContent = `HTTP ${reply.status_code}`;
    result.dataset.status = String(reply.status_code);
    const type = [reply.headers['content-type'] ?? ''].flat()[0];
    const body = reply.body == null ? '' : reply.body;
    let view;
    if (reply.body_encoding === 'base64') {
      view = document.createElement('pre');
      view.textContent = `(${atob(body).length} bytes of binary content, ${type || 'no type'})`;
    } else if (type.startsWith('text/html')) {
      // Scripts and forms of the service stay inert in a sandboxed frame.
      view = document.createElement('iframe');
      view.setAttribute('sandbox', '');
      view.srcdoc = body;
    } else {
      view = document.createElement('pre');
      view.textContent = body;
    }
    view.className = 'proxy-body';
    result.replaceChildren(head, view);
  }
}

function decodeField(text, encoding) {
  if (encoding !== 'base64') return text;
  return new TextDecoder().decode(Uint8Array.from(atob(text), (c) => c.charCodeAt(0)));
}

const app = new App();
// Tests and curious operators reach the live state here.
window.cocoon = app;
app.start();
