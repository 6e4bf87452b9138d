// The browser terminal in Debian's Chromium, driven by playwright-core, for
// cocoon-bench's `chromium` system (bench/src/chromium.rs builds the network
// namespace this runs in, the server and the worker). One run is one round:
//
//   node bench.mjs
//
// Environment: COCOON_PAGE (the page URL with the token in its fragment),
// BENCH_ECHOES (one-byte echoes), BENCH_BYTES (output of the throughput run),
// BENCH_STALL_MS (how long the page stops reading during a flood).
//
// Everything is timed in the page with performance.now() (which Chromium
// rounds to 100 µs for a page like this one, not cross-origin isolated),
// never over the DevTools round trip. On stdout, one JSON line per step, so
// that cocoon-bench can read the worker's CPU time and memory at the right
// moments; after `throughput`, `stall_open` and `stalled` this waits for a
// line on stdin. The last line, `figures`, has the page's figures. Progress
// goes to stderr.

import { createRequire } from 'node:module';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';

const web = new URL('../../examples/web/package.json', import.meta.url);
const { chromium } = createRequire(web)('playwright-core');

const PAGE = process.env.COCOON_PAGE;
const ECHOES = Number(process.env.BENCH_ECHOES);
const BYTES = Number(process.env.BENCH_BYTES);
const STALL_MS = Number(process.env.BENCH_STALL_MS);
/** How long to wait for anything before calling the run failed (term.rs's STALL). */
const WAIT = 30_000;
/**
 * The window: the page fits its terminal to what is left of it, and this
 * leaves 80×24, the size every other system of the bench uses.
 */
const VIEWPORT = { width: 958, height: 486 };

const log = (...args) => console.error('[chromium]', ...args);
const say = (step, figures = {}) => process.stdout.write(`${JSON.stringify({ step, ...figures })}\n`);

async function launch() {
  const profile = mkdtempSync(join(tmpdir(), 'cocoon-bench-chromium-'));
  try {
    const context = await chromium.launchPersistentContext(profile, {
      executablePath: '/usr/bin/chromium',
      headless: true,
      viewport: VIEWPORT,
      args: [
        '--headless',
        '--no-sandbox',
        '--disable-gpu',
        '--disable-quic',
        '--no-first-run',
        '--disable-background-networking',
        '--disable-component-update',
        '--disable-sync',
        // Real host candidates instead of mDNS names the worker cannot resolve.
        '--disable-features=WebRtcHideLocalIpsWithMdns',
      ],
    });
    return {
      context,
      async close() {
        await context.close().catch(() => {});
        rmSync(profile, { recursive: true, force: true });
      },
    };
  } catch (err) {
    rmSync(profile, { recursive: true, force: true });
    throw err;
  }
}

/**
 * Runs in the page before its own scripts: the measuring tools, on
 * `window.bench` (`wait` is WAIT). Nothing here changes how the page
 * behaves. It reads the terminal that the page exposes (`window.cocoon`)
 * and types through xterm.js's `term.input`, the step a real key press ends
 * in once its keyboard event is translated: xterm.js fires `onData`, which
 * the page forwards to the session.
 */
function instrument(wait) {
  const bench = {
    /** When the page opened its connection to the server. */
    connectAt: null,
    /** When the device's "+ terminal" was clicked. */
    openedAt: null,
    /** When the first terminal showed its first output (the prompt). */
    promptAt: null,
  };
  window.bench = bench;

  // The page's one WebSocket is its connection to the server.
  const NativeWebSocket = window.WebSocket;
  window.WebSocket = class extends NativeWebSocket {
    constructor(...args) {
      const at = performance.now();
      super(...args);
      bench.connectAt ??= at;
    }
  };

  const term = () => window.cocoon.active.term;
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  /**
   * Resolves with the time of the first render after which `done()` holds;
   * fails when nothing new is drawn for `wait` ms.
   */
  bench.rendered = (done, what) =>
    new Promise((resolve, reject) => {
      const stalled = () => {
        subscription.dispose();
        reject(new Error(`${what}: nothing new on screen for ${wait} ms`));
      };
      let timer = setTimeout(stalled, wait);
      const subscription = term().onRender(() => {
        const at = performance.now();
        clearTimeout(timer);
        if (done()) {
          subscription.dispose();
          resolve(at);
        } else {
          timer = setTimeout(stalled, wait);
        }
      });
    });

  /** The lines of the active buffer from `from` to the cursor's. */
  const lines = (from) => {
    const buffer = term().buffer.active;
    const out = [];
    for (let y = from; y <= buffer.baseY + buffer.cursorY; y++) {
      out.push(buffer.getLine(y)?.translateToString(true) ?? '');
    }
    return out;
  };
  const cursorLine = () => term().buffer.active.baseY + term().buffer.active.cursorY;

  /** Opens a terminal as the device's "+ terminal" button does; resolves once its prompt shows. */
  bench.open = () => {
    document.querySelector('.device .open-terminal').click();
    return bench.rendered(() => lines(0).some((l) => l.trim()), 'the prompt');
  };

  /**
   * Types `text` (as keys) and resolves once a line equal to `line` shows
   * just above the cursor (only there: after a flood, the buffer is long).
   */
  bench.runUntil = (text, line) => {
    const from = cursorLine();
    const near = () => lines(Math.max(from, cursorLine() - 2));
    const shown = bench.rendered(() => near().some((l) => l.trim() === line), line);
    term().input(text);
    return shown;
  };

  /** The page's frame interval, ms: the median of 30 animation frames. */
  const frameInterval = async () => {
    const times = [];
    while (times.length <= 30) times.push(await new Promise(requestAnimationFrame));
    const gaps = times.slice(1).map((t, i) => t - times[i]).sort((a, b) => a - b);
    return gaps[gaps.length >> 1];
  };
  /**
   * `count` times: a key typed, then the time to its echo in the buffer
   * (parsed: xterm.js's onWriteParsed) and on screen (rendered: its
   * onRender, which comes with the next animation frame), µs. `cat` runs in
   * canonical mode, so each echo is one more `a` on the lines being typed.
   *
   * Typed back to back, each key would leave right after a frame and every
   * echo would take exactly one frame to show; a person types at any point
   * of the frame. So each key waits a part of a frame first, spread evenly
   * over the frame (golden-ratio steps, the same every run).
   */
  bench.echoes = async (count) => {
    const frame = await frameInterval();
    const from = cursorLine();
    const typed = () => lines(from).reduce((n, l) => n + l.split('a').length - 1, 0);
    const parsed = [];
    const rendered = [];
    for (let i = 1; i <= count; i++) {
      await sleep(((i * 0.6180339887) % 1) * frame);
      let parsedAt = null;
      const watch = term().onWriteParsed(() => {
        if (parsedAt === null && typed() >= i) parsedAt = performance.now();
      });
      const shown = bench.rendered(() => typed() >= i, `echo ${i}`);
      const start = performance.now();
      term().input('a');
      try {
        const at = await shown;
        parsed.push(((parsedAt ?? at) - start) * 1000);
        rendered.push((at - start) * 1000);
      } finally {
        watch.dispose();
      }
    }
    return { parsed, rendered, frame };
  };

  /**
   * Ends the terminal as a user would (Ctrl-C, exit), waits (a little) for
   * it to be over, then closes its tab — which ends the program if it still
   * runs: left running, it would cost the worker CPU in later measurements.
   */
  bench.close = async () => {
    const tab = window.cocoon.active;
    tab.term.input('\x03');
    await sleep(100);
    tab.term.input('\x03exit\r');
    const until = performance.now() + 5000;
    while (tab.state !== 'exited' && performance.now() < until) await sleep(20);
    window.cocoon.closeTab(tab);
  };

  // The user's first click: "+ terminal" as soon as the device is online.
  document.addEventListener('DOMContentLoaded', () => {
    const observer = new MutationObserver(() => {
      if (!document.querySelector('.device .open-terminal:enabled')) return;
      observer.disconnect();
      bench.openedAt = performance.now();
      bench.open().then((at) => {
        bench.promptAt = at;
      });
    });
    observer.observe(document.body, { childList: true, subtree: true, attributes: true });
  });
}

async function main() {
  const input = createInterface({ input: process.stdin });
  const stdin = input[Symbol.asyncIterator]();
  // An open stdin keeps node running: closed whatever happens.
  const browser = await launch().catch((err) => {
    input.close();
    throw err;
  });
  try {
    const page = browser.context.pages()[0] ?? (await browser.context.newPage());
    page.on('console', (message) => {
      if (message.type() === 'error' || message.type() === 'warning') log('page:', message.text());
    });
    page.on('pageerror', (err) => log('page error:', err.message));
    await page.addInitScript(instrument, WAIT);
    await page.goto(PAGE);

    // Connect → prompt: the page's connection, the device list, the click,
    // the session (over the relay while ICE runs), the prompt on screen.
    await page.waitForFunction(() => window.bench.promptAt !== null, null, { timeout: WAIT });
    const { connectAt, openedAt, promptAt } = await page.evaluate(() => window.bench);
    const size = await page.evaluate(() => `${window.cocoon.active.term.cols}×${window.cocoon.active.term.rows}`);
    // What the system is about: the data channel carries the terminal.
    await page.waitForFunction(() => document.querySelector('#status').dataset.path === 'p2p', null, {
      timeout: WAIT,
    });
    const p2pAt = await page.evaluate(() => performance.now());
    const since = (at) => `${(at - connectAt).toFixed(0)} ms`;
    log(`terminal ${size}; from the connection: device listed ${since(openedAt)}, prompt ${since(promptAt)}, P2P ≤ ${since(p2pAt)}`);

    await page.evaluate(() => window.bench.runUntil("stty -echo; echo REA''DY; stty echo; exec cat\r", 'READY'));
    // Let `cat` start.
    await page.waitForTimeout(300);
    const echo = await page.evaluate((count) => window.bench.echoes(count), ECHOES);
    await page.evaluate(() => window.bench.close());

    // A fresh terminal on the same page and session (its data channel is up).
    await page.evaluate(() => window.bench.open());
    await page.waitForTimeout(300);
    say('throughput');
    await stdin.next();
    const took = await page.evaluate(async (bytes) => {
      const start = performance.now();
      const done = await window.bench.runUntil(
        `stty -echo; head -c ${bytes} /dev/zero | tr '\\0' a; echo; echo DO''NE\r`,
        'DONE',
      );
      const stream = window.cocoon.active.stream;
      if (stream.written < bytes) throw new Error(`DONE after ${stream.written} of ${bytes} bytes`);
      return done - start;
    }, BYTES);
    say('throughput_done');
    // A figure of the data channel, not of a fallback to the relay.
    const status = await page.$eval('#status', (el) => ({ path: el.dataset.path, text: el.textContent }));
    if (status.path !== 'p2p') throw new Error(`off the data channel after the throughput run: ${status.text}`);
    await page.evaluate(() => window.bench.close());

    // A page that stops reading during a flood: its main thread busy, as in
    // a frozen tab. Output piles up in Chromium unacknowledged, so the
    // worker may send no more than its window.
    await page.evaluate(() => window.bench.open());
    say('stall_open');
    await stdin.next();
    await page.evaluate(() => window.bench.runUntil('yes\r', 'y'));
    say('stalled');
    await page.evaluate((ms) => {
      const end = performance.now() + ms;
      while (performance.now() < end);
    }, STALL_MS);
    await stdin.next();
    await page.evaluate(() => window.bench.close());

    say('figures', {
      first_prompt_ms: promptAt - connectAt,
      echo_rendered_us: echo.rendered,
      echo_parsed_us: echo.parsed,
      frame_ms: echo.frame,
      throughput_ms: took,
    });
  } finally {
    input.close();
    await browser.close();
  }
}

main().catch((err) => {
  console.error(err);
  process.exitCode = 1;
});
