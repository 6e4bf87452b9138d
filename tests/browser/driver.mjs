// Drives the browser terminal in Debian's Chromium with playwright-core, for
// tests/browser.rs, which builds the network (a namespace this runs in), the
// server and the worker, then runs one scenario here:
//
//   node driver.mjs SCENARIO
//
// Environment: COCOON_PAGE (the page URL with the token in its fragment),
// COCOON_HEALTH (the server's /health URL), COCOON_ARTIFACTS (a directory for
// screenshots). Prints what it checks; exits non-zero when a check fails.

import { execFileSync } from 'node:child_process';
import { createRequire } from 'node:module';
import { mkdtempSync, mkdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import assert from 'node:assert/strict';

const web = new URL('../../examples/web/package.json', import.meta.url);
const { chromium } = createRequire(web)('playwright-core');

const PAGE = process.env.COCOON_PAGE;
const HEALTH = process.env.COCOON_HEALTH;
const ARTIFACTS = process.env.COCOON_ARTIFACTS;
/** Generous: CI runs Chromium, the worker and the server on two cores. */
const WAIT = 20_000;

const log = (...args) => console.log('[driver]', ...args);

async function launch() {
  const profile = mkdtempSync(join(tmpdir(), 'cocoon-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: '/usr/bin/chromium',
    headless: true,
    viewport: { width: 1100, height: 700 },
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
      // The page is served from a 10.x address; the clipboard API wants a
      // secure context, as on 127.0.0.1 or behind TLS.
      `--unsafely-treat-insecure-origin-as-secure=${new URL(PAGE).origin}`,
    ],
  });
  await context.grantPermissions(['clipboard-read', 'clipboard-write'], { origin: new URL(PAGE).origin });
  const page = context.pages()[0] ?? (await context.newPage());
  page.on('console', (message) => {
    if (message.type() === 'error' || message.type() === 'warning') log('page:', message.text());
  });
  page.on('pageerror', (err) => log('page error:', err.message));
  return {
    page,
    async close() {
      await context.close();
      rmSync(profile, { recursive: true, force: true });
    },
  };
}

/** Every line of the active terminal's buffer, scrollback included. */
async function bufferLines(page) {
  return page.evaluate(() => {
    const term = window.cocoon.active?.term;
    if (!term) return [];
    const buffer = term.buffer.active;
    const lines = [];
    for (let y = 0; y < buffer.length; y++) lines.push(buffer.getLine(y).translateToString(true));
    return lines;
  });
}

/** Waits until some line of the active terminal equals `line` (trimmed). */
async function waitForLine(page, line, timeout = WAIT) {
  await page.waitForFunction(
    (wanted) => {
      const term = window.cocoon.active?.term;
      if (!term) return false;
      const buffer = term.buffer.active;
      for (let y = 0; y < buffer.length; y++) {
        if (buffer.getLine(y).translateToString(true).trim() === wanted) return true;
      }
      return false;
    },
    line,
    { timeout, polling: 50 },
  );
}

/** Waits until the visible screen matches `pattern`. */
async function waitForScreen(page, pattern, timeout = WAIT) {
  await page.waitForFunction(
    (source) => new RegExp(source, 'm').test(window.cocoon.active?.screenText().join('\n') ?? ''),
    pattern.source,
    { timeout, polling: 50 },
  );
}

async function statusPath(page) {
  return page.$eval('#status', (el) => ({ path: el.dataset.path, text: el.textContent }));
}

async function relayedBytes() {
  const health = await (await fetch(HEALTH)).json();
  return health.relayed_bytes;
}

/** Opens the page and a terminal on the only device; returns when it is running. */
async function openTerminal(page) {
  await page.goto(PAGE);
  const button = page.locator('.device .open-terminal');
  await button.waitFor({ timeout: WAIT });
  await page.waitForFunction(() => !document.querySelector('.device .open-terminal').disabled, null, {
    timeout: WAIT,
  });
  await button.click();
  await page.waitForFunction(() => window.cocoon.active?.state === 'running', null, { timeout: WAIT });
  // Wait for the shell to print something (its prompt) before typing.
  await page.waitForFunction(() => window.cocoon.active.screenText().some((l) => l.trim()), null, {
    timeout: WAIT,
  });
  await page.locator('.terminal:not([hidden]) .xterm').click();
}

/** Types a command line and presses Enter. */
async function run(page, command) {
  await page.keyboard.type(command);
  await page.keyboard.press('Enter');
}

async function screenshot(page, name) {
  mkdirSync(ARTIFACTS, { recursive: true });
  const path = join(ARTIFACTS, `${name}.png`);
  await page.screenshot({ path });
  log('screenshot:', path);
}

const scenarios = {
  /** P2P: the answer, the selected pair, (almost) nothing relayed, resizing. */
  async p2p(page) {
    await openTerminal(page);
    await page.waitForFunction(() => document.querySelector('#status').dataset.path === 'p2p', null, {
      timeout: WAIT,
    });
    const pair = await page.evaluate(() =>
      window.cocoon.sessions.get(window.cocoon.active.deviceId).candidatePair(),
    );
    log('selected pair:', JSON.stringify(pair));
    assert.equal(pair.state, 'succeeded');
    assert.ok(['host', 'prflx'].includes(pair.local), `local candidate ${pair.local}`);
    assert.ok(['host', 'prflx'].includes(pair.remote), `remote candidate ${pair.remote}`);
    await page.waitForFunction(() => /RTT \d+\.\d ms/.test(document.querySelector('#status').textContent));
    const status = await statusPath(page);
    log('status:', status.text);
    assert.match(status.text, /P2P/);

    const before = await relayedBytes();
    await run(page, 'echo $((6*7))');
    await waitForLine(page, '42');
    // About 200 KB of output, then a marker: all of it must come peer to peer.
    await run(page, 'seq 1 40000 | tail -c 100; echo done-$((2*3))');
    await waitForLine(page, 'done-6');
    const relayed = (await relayedBytes()) - before;
    log(`relayed while on P2P: ${relayed} bytes`);
    assert.ok(relayed < 4096, `${relayed} bytes went through the relay`);

    // The terminal follows the window.
    const cols = await page.evaluate(() => window.cocoon.active.term.cols);
    await page.setViewportSize({ width: 760, height: 560 });
    await page.waitForFunction((old) => window.cocoon.active.term.cols !== old, cols, { timeout: WAIT });
    const narrower = await page.evaluate(() => window.cocoon.active.term.cols);
    log(`cols ${cols} → ${narrower}`);
    assert.ok(narrower < cols);
    await run(page, 'tput cols');
    await waitForLine(page, String(narrower));

    // A second tab on the same device works alongside the first.
    await page.locator('.device .open-terminal').click();
    await page.waitForFunction(() => window.cocoon.tabs.length === 2 && window.cocoon.active.state === 'running');
    await page.waitForFunction(() => window.cocoon.active.screenText().some((l) => l.trim()), null, {
      timeout: WAIT,
    });
    await page.locator('.terminal:not([hidden]) .xterm').click();
    await run(page, 'echo second-$((3*3))');
    await waitForLine(page, 'second-9');
    await screenshot(page, 'p2p');
  },

  /** Behind NATs that only TURN gets through: the terminal runs over TURN. */
  async turn(page) {
    await openTerminal(page);
    await page.waitForFunction(() => document.querySelector('#status').dataset.path === 'turn', null, {
      timeout: 40_000,
    });
    const pair = await page.evaluate(() =>
      window.cocoon.sessions.get(window.cocoon.active.deviceId).candidatePair(),
    );
    log('selected pair:', JSON.stringify(pair));
    assert.equal(pair.state, 'succeeded');
    assert.ok(pair.local === 'relay' || pair.remote === 'relay', 'a relay candidate carries it');
    assert.match((await statusPath(page)).text, /TURN/);
    const before = await relayedBytes();
    await run(page, 'echo $((6*7))');
    await waitForLine(page, '42');
    const relayed = (await relayedBytes()) - before;
    log(`relayed by the signaling server meanwhile: ${relayed} bytes`);
    assert.ok(relayed < 4096);
    await screenshot(page, 'turn');
  },

  /** UDP blocked: the same, over the relay, and the status line says so. */
  async relay(page) {
    await openTerminal(page);
    const before = await relayedBytes();
    await run(page, 'echo $((6*7))');
    await waitForLine(page, '42');
    const status = await statusPath(page);
    log('status:', status.text);
    assert.equal(status.path, 'relay');
    assert.match(status.text, /Relay/);
    assert.ok((await relayedBytes()) > before, 'the relay carried the terminal');
    await screenshot(page, 'relay');
  },

  /**
   * ICE succeeds but DTLS cannot (datagrams of 300 bytes and more are
   * dropped, STUN checks are smaller): the page gives the attempt up after a
   * while and tries again, and takes the path once it works.
   */
  async stalled(page) {
    const rules = ['INPUT', 'OUTPUT'].map((chain) => [
      chain, '-p', 'udp', '-m', 'length', '--length', '300:65535', '-j', 'DROP',
    ]);
    for (const rule of rules) execFileSync('iptables', ['-I', ...rule]);
    try {
      await openTerminal(page);
      await page.waitForFunction(
        () => /attempt stalled; trying again/.test(document.querySelector('#status').textContent),
        null,
        { timeout: WAIT },
      );
      assert.equal((await statusPath(page)).path, 'relay');
      log('the stalled attempt was given up');
    } finally {
      for (const rule of rules) execFileSync('iptables', ['-D', ...rule]);
    }
    await page.waitForFunction(() => document.querySelector('#status').dataset.path === 'p2p', null, {
      timeout: WAIT,
    });
    await run(page, 'echo through-$((5*5))');
    await waitForLine(page, 'through-25');
  },

  /** vim opens, survives a reload of the page, and quits cleanly. */
  async vim(page) {
    await openTerminal(page);
    await run(page, 'vim -u NONE -N');
    await waitForScreen(page, /^~\s*$/);
    await page.keyboard.type('ihello from cocoon');
    await page.keyboard.press('Escape');
    await waitForScreen(page, /^hello from cocoon$/);
    assert.equal(await page.evaluate(() => window.cocoon.active.term.buffer.active.type), 'alternate');

    await page.reload();
    await page.waitForFunction(() => window.cocoon.active?.state === 'running', null, { timeout: WAIT });
    await waitForScreen(page, /^hello from cocoon$/);
    await waitForScreen(page, /^~\s*$/);
    log('the screen came back after the reload');
    await screenshot(page, 'vim-after-reload');

    await page.locator('.terminal:not([hidden]) .xterm').click();
    await page.keyboard.type(':q!');
    await page.keyboard.press('Enter');
    await page.waitForFunction(() => window.cocoon.active.term.buffer.active.type === 'normal', null, {
      timeout: WAIT,
    });
    await run(page, 'echo vim-exit-$?');
    await waitForLine(page, 'vim-exit-0');
  },

  /** `yes` for 5 s, Ctrl-C: the prompt is back within a second, the page responsive. */
  async flood(page) {
    await openTerminal(page);
    await run(page, 'yes');
    await waitForScreen(page, /^y$/);
    const started = Date.now();
    let worstEvaluate = 0;
    while (Date.now() - started < 5000) {
      const at = Date.now();
      await page.evaluate(() => window.cocoon.active.term.cols);
      worstEvaluate = Math.max(worstEvaluate, Date.now() - at);
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    log(`slowest page round trip during the flood: ${worstEvaluate} ms`);
    assert.ok(worstEvaluate < 1000, 'the page stays responsive');
    const interrupted = Date.now();
    await page.keyboard.press('Control+C');
    await run(page, 'echo back-$((40+2))');
    await waitForLine(page, 'back-42', 5000);
    const elapsed = Date.now() - interrupted;
    log(`Ctrl-C → prompt and answer: ${elapsed} ms`);
    assert.ok(elapsed < 1000, `the prompt took ${elapsed} ms to come back`);
    await screenshot(page, 'flood');
  },

  /** The connection to the server drops: the session resumes, no byte twice. */
  async reconnect(page) {
    await openTerminal(page);
    await run(page, 'echo before-$((6*7))');
    await waitForLine(page, 'before-42');
    const client = await page.evaluate(() => window.cocoon.connection.clientId);
    await page.evaluate(() => window.cocoon.connection.ws.close());
    await page.waitForFunction(
      (old) => window.cocoon.connection.clientId && window.cocoon.connection.clientId !== old,
      client,
      { timeout: WAIT },
    );
    await run(page, 'echo after-$((6*7))');
    await waitForLine(page, 'after-42');
    const lines = await bufferLines(page);
    const count = (wanted) => lines.filter((l) => l.trim() === wanted).length;
    assert.equal(count('before-42'), 1, 'output before the drop shown once');
    assert.equal(count('after-42'), 1);
  },

  /**
   * The network goes away for 8 s with a command typed in the dark: the
   * data channel fails, the session falls back to the relay (whose TCP
   * connection outlives the outage), the answer arrives exactly once, and a
   * new peer-to-peer path is offered and taken.
   */
  async outage(page) {
    await openTerminal(page);
    await page.waitForFunction(() => document.querySelector('#status').dataset.path === 'p2p', null, {
      timeout: WAIT,
    });
    const rules = [
      ['INPUT', '!', '-i', 'lo', '-j', 'DROP'],
      ['OUTPUT', '!', '-o', 'lo', '-j', 'DROP'],
    ];
    for (const rule of rules) execFileSync('iptables', ['-I', ...rule]);
    try {
      await run(page, 'echo dark-$((8*8))');
      await page.waitForFunction(() => document.querySelector('#status').dataset.path === 'relay', null, {
        timeout: WAIT,
      });
      log('fell back to the relay while the network was down');
    } finally {
      for (const rule of rules) execFileSync('iptables', ['-D', ...rule]);
    }
    await waitForLine(page, 'dark-64');
    await page.waitForFunction(() => document.querySelector('#status').dataset.path === 'p2p', null, {
      timeout: WAIT,
    });
    log('back on P2P');
    await run(page, 'echo light-$((9*9))');
    await waitForLine(page, 'light-81');
    const lines = await bufferLines(page);
    assert.equal(lines.filter((l) => l.trim() === 'dark-64').length, 1, 'the answer arrived once');
  },

  /** Ctrl+Shift+C copies the selection, Ctrl+Shift+V pastes, OSC 52 sets the clipboard. */
  async clipboard(page) {
    await openTerminal(page);
    const clipboard = () => page.evaluate(() => navigator.clipboard.readText());

    await run(page, "printf '\\033]52;c;%s\\a' $(printf from-osc52 | base64)");
    await page.waitForFunction(async () => (await navigator.clipboard.readText()) === 'from-osc52', null, {
      timeout: WAIT,
      polling: 100,
    });

    await run(page, 'echo copy-$((5*5))');
    await waitForLine(page, 'copy-25');
    await page.evaluate(() => {
      const term = window.cocoon.active.term;
      const buffer = term.buffer.active;
      for (let y = buffer.length - 1; y >= 0; y--) {
        if (buffer.getLine(y).translateToString(true).trim() === 'copy-25') {
          term.select(0, y, 7);
          return;
        }
      }
    });
    await page.keyboard.press('Control+Shift+C');
    await page.waitForFunction(async () => (await navigator.clipboard.readText()) === 'copy-25', null, {
      timeout: WAIT,
      polling: 100,
    });
    log('copied:', await clipboard());

    await page.evaluate(() => navigator.clipboard.writeText('echo pasted-$((6*6))'));
    await page.keyboard.press('Control+Shift+V');
    await page.keyboard.press('Enter');
    await waitForLine(page, 'pasted-36');
  },

  /**
   * The worker's own connection to the server breaks (its socket is reset in
   * the test's namespace): the worker reconnects and forgets its clients, the
   * page notices the device coming back and resumes the terminal.
   */
  async worker(page) {
    await openTerminal(page);
    await run(page, 'echo before-$((6*7))');
    await waitForLine(page, 'before-42');
    const server = new URL(PAGE);
    execFileSync('nsenter', [
      `--net=${process.env.COCOON_HOST_NETNS}`,
      'ss', '-K', 'dst', server.hostname, 'dport', '=', `:${server.port}`,
    ]);
    log("reset the worker's connection");
    await run(page, 'echo after-$((6*7))');
    await waitForLine(page, 'after-42');
    const lines = await bufferLines(page);
    const count = (wanted) => lines.filter((l) => l.trim() === wanted).length;
    assert.equal(count('before-42'), 1, 'output before the break shown once');
    assert.equal(count('after-42'), 1);
  },

  /** The tools panel: a one-off command and an HTTP service through the proxy. */
  async tools(page) {
    await page.goto(PAGE);
    await page.locator('.device').waitFor({ timeout: WAIT });
    await page.fill('#run-command', 'echo tool-$((2+3)); exit 3');
    await page.click('#run-form button');
    await page.waitForFunction(() => document.querySelector('#run-output').dataset.exitCode === '3', null, {
      timeout: WAIT,
    });
    assert.match(await page.textContent('#run-output'), /tool-5/);
    await page.fill('#proxy-service', 'web');
    await page.fill('#proxy-path', '/page.html');
    await page.click('#proxy-form button');
    await page.waitForFunction(() => document.querySelector('#proxy-result').dataset.status === '200', null, {
      timeout: WAIT,
    });
    const heading = page.frameLocator('#proxy-result iframe').locator('h1');
    assert.equal(await heading.textContent({ timeout: WAIT }), 'served by the worker');
    await page.fill('#proxy-service', 'nope');
    await page.click('#proxy-form button');
    await page.waitForFunction(() => document.querySelector('#proxy-result').dataset.status === '404', null, {
      timeout: WAIT,
    });
  },
};

const name = process.argv[2];
const scenario = scenarios[name];
if (!scenario) {
  console.error(`unknown scenario ${name}; one of ${Object.keys(scenarios).join(', ')}`);
  process.exit(2);
}
const browser = await launch();
try {
  await scenario(browser.page);
  log(`${name}: ok`);
} catch (err) {
  await screenshot(browser.page, `${name}-failure`).catch(() => {});
  const lines = await bufferLines(browser.page).catch(() => []);
  log('terminal at failure:\n' + lines.filter((l) => l.trim()).slice(-30).join('\n'));
  log('status at failure:', await browser.page.textContent('#status').catch(() => '?'));
  console.error(err);
  process.exitCode = 1;
} finally {
  await browser.close();
}
