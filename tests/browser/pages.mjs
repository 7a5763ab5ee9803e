// The chat page and the dashboard in a real browser: the system Chromium (Debian's
// `chromium` package), headless, driven by puppeteer-core. Nothing here downloads a
// browser. Run by tests/e2e/browser.rs; runnable by hand against any server:
//
//   SOCKHOST_URL=http://127.0.0.1:8080 SCREENSHOT_DIR=docs node tests/browser/pages.mjs
//
// Settings (environment):
//   SOCKHOST_URL    the server's public base URL (required)
//   DASHBOARD_URL   the dashboard; default SOCKHOST_URL/dashboard
//   CHROMIUM        the browser; default /usr/bin/chromium
//   SCREENSHOT_DIR  where chat.png and dashboard.png are written; none when unset
//   LOCKSTEP=1      after each chunk of the reply shows on the page, print
//                   `chunk <n> <text so far>` and expect the page to show no further
//                   chunk yet: the Rust test lets its fake model send the next delta
//                   only when it reads that line, so this proves each chunk is rendered
//                   as it arrives, not when the reply is complete.
//
// What it checks, in order: the page loads with no request to another origin and no
// console error; the selector lists the mounted addons and aikefu is connected with its
// greeting; "什么时候发货？" gets a reply in several chunks that ends complete; a frame
// aikefu cannot parse gets an error frame, shown as an error and in the raw view; the
// dashboard counts the page's connection and its messages; switching the selector to
// echo moves the connection, and the dashboard follows.
//
// Progress goes to stdout; on failure the step, the reason and the page's state go to
// stderr and the exit status is 1.

import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import puppeteer from 'puppeteer-core';

const base = required('SOCKHOST_URL').replace(/\/$/, '');
const dashboardUrl = process.env.DASHBOARD_URL || `${base}/dashboard`;
const chromium = process.env.CHROMIUM || '/usr/bin/chromium';
const screenshots = process.env.SCREENSHOT_DIR || null;
const lockstep = process.env.LOCKSTEP === '1';
/** How long one step may take before the run fails: a guard against hangs, not a speed test. */
const STEP_MS = 20_000;
const QUESTION = '什么时候发货？';

function required(name) {
  const value = process.env[name];
  if (!value) {
    console.error(`set ${name}`);
    process.exit(2);
  }
  return value;
}

/** Runs one named step; a failure says which step, and shows the page. */
let currentPage = null;
async function step(name, action) {
  try {
    const result = await action();
    console.log(`ok: ${name}`);
    return result;
  } catch (err) {
    console.error(`FAILED: ${name}: ${err.message}`);
    if (currentPage) {
      const shown = await currentPage
        .evaluate(() => document.body.innerText)
        .catch((e) => `(cannot read the page: ${e.message})`);
      console.error(`--- the page (${currentPage.url()}) shows:\n${shown}\n---`);
    }
    throw err;
  }
}

/** Fails the run on anything that would mean the page misbehaves in a browser. */
function watch(page, origins, problems) {
  page.on('console', (message) => {
    if (message.type() === 'error') {
      problems.push(`console error on ${page.url()}: ${message.text()}`);
    }
  });
  page.on('pageerror', (err) => problems.push(`uncaught exception on ${page.url()}: ${err.message}`));
  page.on('request', (request) => {
    const url = request.url();
    if (!url.startsWith('data:') && !origins.includes(new URL(url).origin)) {
      problems.push(`a request to another origin: ${url}`);
    }
  });
}

/** The last reply bubble's state: how many chunks it has shown, whether it is complete. */
function lastReply(page) {
  return page.evaluate(() => {
    const replies = document.querySelectorAll('#messages .msg-reply');
    const reply = replies[replies.length - 1];
    if (!reply) {
      return null;
    }
    return {
      chunks: Number(reply.dataset.chunks),
      state: reply.dataset.state,
      text: reply.querySelector('.text').textContent,
      count: replies.length,
    };
  });
}

async function main() {
  const origins = [new URL(base).origin, new URL(dashboardUrl).origin];
  const problems = [];
  const args = ['--disable-dev-shm-usage', '--lang=zh-CN'];
  // Chromium refuses to run its sandbox as root (CI containers run as root).
  if (process.getuid && process.getuid() === 0) {
    args.push('--no-sandbox');
  }
  const browser = await step(`launch ${chromium}`, () =>
    puppeteer.launch({
      executablePath: chromium,
      headless: true,
      args,
      defaultViewport: { width: 1180, height: 720 },
    }),
  );
  try {
    const chat = await browser.newPage();
    currentPage = chat;
    watch(chat, origins, problems);

    await step('open the chat page', async () => {
      const response = await chat.goto(`${base}/`, { waitUntil: 'load', timeout: STEP_MS });
      if (response.status() !== 200) {
        throw new Error(`GET / answered ${response.status()}`);
      }
    });
    const addons = await step('the selector lists the mounted addons and aikefu connects', async () => {
      await chat.waitForSelector('#status[data-state="open"]', { timeout: STEP_MS });
      const listed = await chat.$$eval('#addon option', (options) => options.map((o) => o.value));
      const selected = await chat.$eval('#addon', (select) => select.value);
      if (!listed.includes('aikefu') || selected !== 'aikefu') {
        throw new Error(`listed ${JSON.stringify(listed)}, selected ${selected}`);
      }
      // aikefu greets each connection with a system frame.
      await chat.waitForSelector('#messages .msg-system', { timeout: STEP_MS });
      return listed;
    });

    await step(`send ${QUESTION}`, async () => {
      await chat.type('#chat-input', QUESTION);
      await chat.click('#chat-send');
      await chat.waitForFunction(
        (question) => [...document.querySelectorAll('#messages .msg-user .text')].some((m) => m.textContent === question),
        { timeout: STEP_MS },
        QUESTION,
      );
    });

    const reply = await step('the reply arrives in several chunks and ends complete', async () => {
      const seen = [];
      for (let wanted = 1; ; wanted += 1) {
        await chat.waitForFunction(
          (n) => {
            const replies = document.querySelectorAll('#messages .msg-reply');
            const reply = replies[replies.length - 1];
            return reply && (Number(reply.dataset.chunks) >= n || reply.dataset.state !== 'streaming');
          },
          { timeout: STEP_MS },
          wanted,
        );
        const now = await lastReply(chat);
        // Streaming, the page shows exactly the chunks sent so far; the `complete` frame may
        // come with the last chunk or after the page showed it alone.
        if (lockstep && now.state === 'streaming' && now.chunks !== wanted) {
          throw new Error(`expected chunk ${wanted} alone on the page, found ${now.chunks}: ${now.text}`);
        }
        if (seen.length > 0 && !now.text.startsWith(seen[seen.length - 1])) {
          throw new Error(`the text shown went from ${JSON.stringify(seen.at(-1))} to ${JSON.stringify(now.text)}`);
        }
        seen.push(now.text);
        if (now.state !== 'streaming') {
          if (now.state !== 'complete') {
            throw new Error(`the reply ended ${now.state}: ${now.text}`);
          }
          if (now.chunks < 3 || now.text === '') {
            throw new Error(`a streamed reply comes in several chunks; got ${now.chunks}: ${now.text}`);
          }
          return now;
        }
        if (lockstep) {
          // The Rust test reads this line and lets the model send its next delta.
          console.log(`chunk ${wanted} ${JSON.stringify(now.text)}`);
        }
      }
    });
    console.log(`reply: ${reply.chunks} chunks: ${JSON.stringify(reply.text)}`);

    // Issue 16: a reply cut off by a dropped connection resumes in the same bubble. Only in
    // lockstep, where the model sends the next delta only when this script says so, so the
    // drop surely comes in the middle of the reply.
    if (lockstep) {
      const resumed = await step('a reply cut off by a dropped connection resumes in the same bubble', async () => {
        const before = (await lastReply(chat)).count;
        await chat.type('#chat-input', QUESTION);
        await chat.click('#chat-send');
        await chat.waitForFunction(
          (n) => {
            const replies = document.querySelectorAll('#messages .msg-reply');
            return replies.length > n && Number(replies[replies.length - 1].dataset.chunks) >= 1;
          },
          { timeout: STEP_MS },
          before,
        );
        // The network goes away (as on a phone) while the model still holds the rest.
        await chat.evaluate(() => window.sockhostChat.ws.close(4000, 'dropped by the browser test'));
        await chat.waitForFunction(
          () =>
            [...document.querySelectorAll('#frames .frame-out code')].some((c) =>
              c.textContent.includes('"action":"resume"'),
            ),
          { timeout: STEP_MS },
        );
        for (let shown = 1; ; shown += 1) {
          console.log(`chunk ${shown} (resumed)`);
          await chat.waitForFunction(
            (n) => {
              const replies = document.querySelectorAll('#messages .msg-reply');
              const reply = replies[replies.length - 1];
              return Number(reply.dataset.chunks) > n || reply.dataset.state !== 'streaming';
            },
            { timeout: STEP_MS },
            shown,
          );
          const now = await lastReply(chat);
          if (now.count !== before + 1) {
            throw new Error(`the resumed reply opened a bubble of its own (${now.count} replies)`);
          }
          if (now.state === 'complete') {
            const marked = await chat.evaluate(
              () => [...document.querySelectorAll('#messages .msg-reply')].at(-1).dataset.resumed,
            );
            if (marked !== 'true') {
              throw new Error('the bubble is not marked as resumed');
            }
            return now;
          }
          if (now.state !== 'streaming') {
            throw new Error(`the resumed reply ended ${now.state}: ${now.text}`);
          }
        }
      });
      console.log(`resumed reply: ${resumed.chunks} chunks: ${JSON.stringify(resumed.text)}`);
    }

    await step('a frame aikefu cannot parse gets an error frame, shown as an error and raw', async () => {
      await chat.type('#raw-input', 'not json');
      await chat.click('#raw-send');
      await chat.waitForSelector('#messages .msg-error[data-code="bad_json"]', { timeout: STEP_MS });
      const frames = await chat.$$eval('#frames .frame', (items) =>
        items.map((item) => [item.className, item.querySelector('code').textContent]),
      );
      const sent = frames.some(([kind, text]) => kind.includes('frame-out') && text === 'not json');
      const answered = frames.some(([kind, text]) => kind.includes('frame-in') && text.includes('"bad_json"'));
      if (!sent || !answered) {
        throw new Error(`the raw view lacks the frames: ${JSON.stringify(frames)}`);
      }
      // Chunks of the first reply are in the raw view too, each as its own frame.
      const chunks = frames.filter(([kind, text]) => kind.includes('frame-in') && text.includes('"type":"chat"'));
      if (chunks.length < reply.chunks) {
        throw new Error(`${chunks.length} chat frames in the raw view for ${reply.chunks} chunks`);
      }
    });
    if (screenshots) {
      mkdirSync(screenshots, { recursive: true });
      await chat.screenshot({ path: join(screenshots, 'chat.png') });
    }

    const dashboard = await browser.newPage();
    currentPage = dashboard;
    watch(dashboard, origins, problems);
    const cell = (addon, field) => `#addons tr[data-addon="${addon}"] td[data-field="${field}"]`;
    await step('the dashboard counts the connection and its messages', async () => {
      const response = await dashboard.goto(dashboardUrl, { waitUntil: 'load', timeout: STEP_MS });
      if (response.status() !== 200) {
        throw new Error(`GET ${dashboardUrl} answered ${response.status()}`);
      }
      await dashboard.waitForFunction(
        (open, messagesIn) => {
          const text = (selector) => document.querySelector(selector)?.textContent;
          return text(open) === '1' && Number(text(messagesIn)) >= 2;
        },
        { timeout: STEP_MS },
        cell('aikefu', 'open_connections'),
        cell('aikefu', 'messages_in_total'),
      );
      // Rates need two snapshots: wait for the second poll.
      await dashboard.waitForFunction(() => document.querySelector('#total-in-rate').textContent !== '–', {
        timeout: STEP_MS,
      });
      const failures = await dashboard.$eval(cell('aikefu', 'failures'), (td) => td.textContent);
      console.log(`dashboard: aikefu failures: ${failures}`);
    });
    if (screenshots) {
      await dashboard.screenshot({ path: join(screenshots, 'dashboard.png') });
    }

    if (addons.includes('echo')) {
      currentPage = chat;
      await step('the selector switches the connection to echo', async () => {
        // Keys go to the tab in front; the dashboard's tab is, now.
        await chat.bringToFront();
        await chat.select('#addon', 'echo');
        await chat.waitForFunction(
          () => {
            const status = document.querySelector('#status');
            return status.dataset.state === 'open' && status.textContent.includes('/ws/echo');
          },
          { timeout: STEP_MS },
        );
        await chat.type('#raw-input', 'hello echo');
        await chat.click('#raw-send');
        await chat.waitForFunction(
          () =>
            [...document.querySelectorAll('#frames .frame-in code')].some((code) => code.textContent === 'hello echo'),
          { timeout: STEP_MS },
        );
      });
      currentPage = dashboard;
      // In front again: a hidden tab gets no animation frames, which waitForFunction polls on.
      await dashboard.bringToFront();
      await step('the dashboard follows the connection to echo', () =>
        dashboard.waitForFunction(
          (aikefu, echo) =>
            document.querySelector(aikefu)?.textContent === '0' && document.querySelector(echo)?.textContent === '1',
          { timeout: STEP_MS },
          cell('aikefu', 'open_connections'),
          cell('echo', 'open_connections'),
        ),
      );
    }

    if (problems.length > 0) {
      throw new Error(`the browser reported problems:\n  ${problems.join('\n  ')}`);
    }
  } finally {
    await browser.close();
  }
  console.log('browser test passed');
}

main().catch((err) => {
  console.error(err.stack || String(err));
  process.exit(1);
});
