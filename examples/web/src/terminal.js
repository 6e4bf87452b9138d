// One terminal tab: an xterm.js view on a TerminalStream. Output is
// acknowledged only after xterm.js has processed it (its write callback), so
// a flood never queues more than the worker's window in the page and Ctrl-C
// gets through at once.

import { Terminal } from '@xterm/xterm';
import { FitAddon } from '@xterm/addon-fit';
import { WebLinksAddon } from '@xterm/addon-web-links';
import { ClipboardAddon } from '@xterm/addon-clipboard';

const utf8 = new TextEncoder();

const THEME = {
  background: '#11151c',
  foreground: '#d8dee9',
  cursor: '#f0c674',
  selectionBackground: '#3b4252',
};

export class TerminalTab {
  /**
   * @param {object} options
   * @param {HTMLElement} options.parent where the view goes
   * @param {string} options.title
   * @param {(tab: TerminalTab) => void} options.onChange the tab's state changed
   */
  constructor({ parent, title, onChange }) {
    this.title = title;
    this.onChange = onChange;
    this.state = 'starting';
    this.sessionId = null;
    this.stream = null;
    this.deviceId = null;
    this.element = document.createElement('div');
    this.element.className = 'terminal';
    parent.appendChild(this.element);
    this.term = new Terminal({
      cursorBlink: true,
      fontFamily: '"DejaVu Sans Mono", "Cascadia Mono", Menlo, monospace',
      fontSize: 14,
      scrollback: 5000,
      theme: THEME,
    });
    this.fit = new FitAddon();
    this.term.loadAddon(this.fit);
    this.term.loadAddon(new WebLinksAddon());
    // OSC 52: programs on the worker may set the local clipboard.
    this.term.loadAddon(new ClipboardAddon());
    this.term.attachCustomKeyEventHandler((event) => this.onKey(event));
    this.term.open(this.element);
    this.term.onData((data) => this.stream?.write(utf8.encode(data)));
    this.term.onBinary((data) => {
      this.stream?.write(Uint8Array.from(data, (c) => c.charCodeAt(0) & 0xff));
    });
    this.term.onResize(({ cols, rows }) => this.stream?.resize(cols, rows));
    this.resizer = new ResizeObserver(() => this.refit());
    this.resizer.observe(this.element);
  }

  /** What the session calls back: see TerminalSink in session.js. */
  sink() {
    return {
      output: (bytes, end) => this.term.write(bytes, () => this.stream?.consumed(end)),
      redraw: (snapshot) => {
        this.term.reset();
        this.term.write(snapshot);
      },
      started: (sessionId) => {
        this.sessionId = sessionId;
        this.setState('running');
      },
      exited: (code) => {
        this.term.write(`\r\n\x1b[2m[process exited with code ${code}]\x1b[0m\r\n`);
        this.setState('exited');
      },
      failed: (message) => {
        this.term.write(`\r\n\x1b[31m[${message}]\x1b[0m\r\n`);
        this.setState('failed');
      },
    };
  }

  /** Starts a new program on `session`. */
  open(session, command) {
    this.refit();
    const options = { cols: this.term.cols, rows: this.term.rows };
    if (command) options.command = command;
    this.deviceId = session.deviceId;
    this.stream = session.openTerminal(options, this.sink());
  }

  /** Takes over a running session (after a reload). */
  resume(session, sessionId, stream) {
    this.deviceId = session.deviceId;
    this.sessionId = sessionId;
    this.stream = session.resumeTerminal(sessionId, stream, this.sink());
    // The size may have changed while nobody watched.
    this.refit();
    this.stream.resize(this.term.cols, this.term.rows);
  }

  /** Ctrl+Shift+C copies the selection; Ctrl+Shift+V is left to the browser's paste. */
  onKey(event) {
    if (event.type !== 'keydown' || !event.ctrlKey || !event.shiftKey) return true;
    if (event.code === 'KeyC') {
      const text = this.term.getSelection();
      if (text) copyText(text);
      return false;
    }
    if (event.code === 'KeyV') return false;
    return true;
  }

  refit() {
    if (this.element.offsetParent === null) return;
    try {
      this.fit.fit();
    } catch {
      // Not laid out yet.
    }
  }

  show(visible) {
    this.element.hidden = !visible;
    if (visible) {
      this.refit();
      this.term.focus();
    }
  }

  /** Ends the program (if still running) and removes the view. */
  close() {
    if (this.state === 'running' || this.state === 'starting') this.stream?.close();
    this.resizer.disconnect();
    this.term.dispose();
    this.element.remove();
  }

  /** The screen as text, one string per row (for tests and screen readers). */
  screenText() {
    const buffer = this.term.buffer.active;
    const rows = [];
    for (let y = 0; y < this.term.rows; y++) {
      rows.push(buffer.getLine(buffer.viewportY + y)?.translateToString(true) ?? '');
    }
    return rows;
  }

  setState(state) {
    this.state = state;
    this.onChange(this);
  }
}

/** Copies text; the async clipboard needs a secure context, else execCommand. */
function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(text).catch(() => fallbackCopy(text));
  } else {
    fallbackCopy(text);
  }
}

function fallbackCopy(text) {
  const area = document.createElement('textarea');
  area.value = text;
  area.style.position = 'fixed';
  area.style.opacity = '0';
  document.body.appendChild(area);
  area.select();
  document.execCommand('copy');
  area.remove();
}
