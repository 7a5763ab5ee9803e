// The chat page's client: a reference client for the seed protocol, the message formats
// of the PHP server sockhost replaces (README, "The protocol"):
//
//   client → server   {"message": "...", "token": "...", "session_id": "...", "action": "chat"}
//   server → client   {"type": "chat", "message": <chunk>, "session_id": "...", "complete": false}
//                     ... more chunks, the last with "complete": true (aikefu's is empty)
//                     {"type": "error", "message": "...", "code": "..."}
//                     {"type": "system", "message": "..."}   (greeting, server push)
//
// A reply is a run of chat frames: the first opens a bubble, each appends its text as
// it arrives, and the one with `complete: true` closes it. An error frame ends a reply
// that was streaming and shows as an error. Frames that are not this protocol (another
// addon's own format, binary frames) show only in the raw view, like every frame.
//
// Resuming (aikefu, README "Resuming a reply"): chunks that carry `reply_id` and `seq` can
// be resumed. When the connection drops in the middle of such a reply, the page
// reconnects after a second and sends {"action":"resume", ..., "reply_id", "after_seq"}
// with the last `seq` it showed; the rest of the reply continues in the same bubble,
// which is then marked as resumed.
//
// Plain DOM, no framework, no build step, nothing loaded from elsewhere. Text from the
// server is only ever set with textContent, never parsed as HTML.
'use strict';

const $ = (id) => document.getElementById(id);

/** The raw view keeps this many frames; older ones are dropped so a long session stays light. */
const MAX_FRAMES = 500;

const state = {
  /** The WebSocket, while one is open or opening. */
  ws: null,
  /** The addon it belongs to. */
  addon: null,
  /** The reply bubble chunks go to, from a reply's first chat frame to its `complete`. */
  reply: null,
  /** A numbered reply cut off by a dropped connection: its bubble, resumed on reconnect. */
  resume: null,
};

/** Seconds before reconnecting to resume a reply cut off by a dropped connection. */
const RESUME_AFTER_MS = 1000;

// For the browser console (and the browser test, which drops the socket through it).
window.sockhostChat = state;

// ---- the connection --------------------------------------------------------------------

/** ws:// or wss:// to this page's own host: the addon's WebSocket path. */
function socketUrl(addon) {
  const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
  return `${scheme}//${location.host}/ws/${encodeURIComponent(addon)}`;
}

/** Opens a connection to `addon`, closing the previous one. */
function connect(addon) {
  if (state.ws) {
    // Detach first: the old socket's close event must not touch the new connection's view.
    const old = state.ws;
    old.onopen = old.onmessage = old.onclose = old.onerror = null;
    old.close(1000, 'switching addon');
  }
  if (addon !== state.addon) {
    state.resume = null; // another addon cannot resume this one's reply
  }
  finishReply('interrupted');
  state.addon = addon;
  setStatus('connecting', `connecting to /ws/${addon}…`);
  const ws = new WebSocket(socketUrl(addon));
  state.ws = ws;
  ws.onopen = () => {
    setStatus('open', `connected to /ws/${addon}`);
    if (state.resume) {
      sendResume();
    }
  };
  ws.onmessage = (event) => receive(event.data);
  ws.onclose = (event) => {
    // 1000 normal, 1001 server going away, 1008 policy (rate limit), 1011 addon failure...
    const reply = state.reply;
    if (reply && reply.dataset.replyId && event.code !== 1011 && event.code !== 1008) {
      // A numbered reply cut off: the server goes on producing it; pick it up again.
      reply.dataset.state = 'dropped';
      state.resume = reply;
      state.reply = null;
      setTimeout(() => {
        if (state.resume === reply && !state.ws) {
          connect(state.addon);
        }
      }, RESUME_AFTER_MS);
    }
    finishReply('interrupted');
    const reason = event.reason ? ` ${event.reason}` : '';
    setStatus('closed', `closed ${event.code}${reason}`);
    logFrame('event', `close ${event.code}${reason}`);
    state.ws = null;
  };
  // Browsers give an error event no detail; the close event that follows has the code.
  ws.onerror = () => {};
}

/** Asks for the rest of the reply cut off by the last dropped connection. */
function sendResume() {
  const bubble = state.resume;
  state.resume = null;
  const request = {
    action: 'resume',
    token: $('token').value,
    session_id: $('session').value,
    reply_id: bubble.dataset.replyId,
    after_seq: Number(bubble.dataset.seq),
  };
  if (send(JSON.stringify(request))) {
    bubble.dataset.state = 'streaming';
    bubble.dataset.resumed = 'true';
    state.reply = bubble;
  }
}

/** Sends one text frame as is; false (and says why) when not connected. */
function send(text) {
  if (!state.ws || state.ws.readyState !== WebSocket.OPEN) {
    addMessage('error', 'not connected: press reconnect or pick an addon', 'client');
    return false;
  }
  state.ws.send(text);
  logFrame('out', text);
  return true;
}

// ---- frames from the server ------------------------------------------------------------

/** Every frame goes to the raw view; seed-protocol frames also to the chat. */
function receive(data) {
  if (typeof data !== 'string') {
    // A binary frame (a Blob): shown by size only.
    logFrame('in', `[binary frame, ${data.size} bytes]`);
    return;
  }
  logFrame('in', data);
  let frame = null;
  try {
    frame = JSON.parse(data);
  } catch {
    return; // not JSON: not the seed protocol
  }
  if (frame === null || typeof frame !== 'object' || typeof frame.type !== 'string') {
    return;
  }
  switch (frame.type) {
    case 'chat':
      onChunk(frame);
      break;
    case 'error':
      // An error ends the reply being streamed, if any: no `complete` will follow it.
      finishReply('interrupted');
      addMessage('error', String(frame.message ?? ''), String(frame.code ?? ''));
      break;
    case 'system':
      addMessage('system', String(frame.message ?? ''));
      break;
    default:
      break; // a type this page does not know: the raw view has it
  }
}

/** A chat frame: one chunk of the reply being streamed. */
function onChunk(frame) {
  if (!state.reply) {
    state.reply = addMessage('reply', '');
    state.reply.dataset.state = 'streaming';
    state.reply.dataset.chunks = '0';
  }
  const bubble = state.reply;
  if (typeof frame.reply_id === 'string' && typeof frame.seq === 'number') {
    if (bubble.dataset.replyId === frame.reply_id && frame.seq <= Number(bubble.dataset.seq)) {
      return; // shown already
    }
    bubble.dataset.replyId = frame.reply_id;
    bubble.dataset.seq = String(frame.seq);
  }
  const chunk = typeof frame.message === 'string' ? frame.message : '';
  if (chunk !== '') {
    // Rendered at once, as it arrives: this is what streaming looks like.
    bubble.querySelector('.text').textContent += chunk;
    bubble.dataset.chunks = String(Number(bubble.dataset.chunks) + 1);
    scrollToEnd($('messages'));
  }
  if (frame.complete === true) {
    finishReply('complete');
  }
}

/** Closes the reply being streamed: `complete`, or `interrupted` by an error or a close. */
function finishReply(how) {
  if (state.reply) {
    state.reply.dataset.state = how;
    state.reply = null;
  }
}

// ---- the view ---------------------------------------------------------------------------

/** Appends a chat bubble (`user`, `reply`, `system` or `error`) and returns it. */
function addMessage(kind, text, code) {
  const item = document.createElement('li');
  item.className = `msg msg-${kind}`;
  const label = document.createElement('span');
  label.className = 'who';
  label.textContent = {
    user: 'you',
    reply: state.addon ?? 'addon',
    system: 'system',
    error: code ? `error · ${code}` : 'error',
  }[kind];
  const body = document.createElement('span');
  body.className = 'text';
  body.textContent = text;
  item.append(label, body);
  if (code) {
    item.dataset.code = code;
  }
  $('messages').append(item);
  scrollToEnd($('messages'));
  return item;
}

/** Appends a frame to the raw view: `in`, `out`, or `event` (open/close notes). */
function logFrame(direction, text) {
  const list = $('frames');
  const item = document.createElement('li');
  item.className = `frame frame-${direction}`;
  const time = document.createElement('time');
  time.textContent = new Date().toISOString().slice(11, 23);
  const arrow = document.createElement('span');
  arrow.className = 'dir';
  arrow.textContent = { in: '←', out: '→', event: '·' }[direction];
  const code = document.createElement('code');
  code.textContent = text;
  item.append(time, arrow, code);
  list.append(item);
  while (list.childElementCount > MAX_FRAMES) {
    list.firstElementChild.remove();
  }
  scrollToEnd(list);
}

/** `connecting`, `open`, `closed` (the reconnect button shows) or `error` (it cannot help). */
function setStatus(stateName, text) {
  const status = $('status');
  status.dataset.state = stateName;
  status.textContent = text;
  $('reconnect').hidden = stateName !== 'closed';
  $('chat-send').disabled = stateName !== 'open';
  $('raw-send').disabled = stateName !== 'open';
}

function scrollToEnd(element) {
  element.scrollTop = element.scrollHeight;
}

/** A session id for this tab: kept across reloads, so aikefu's memory of it continues. */
function sessionId() {
  let id = sessionStorage.getItem('sockhost-session');
  if (!id) {
    // crypto.getRandomValues works on plain http too (randomUUID needs a secure context).
    const bytes = crypto.getRandomValues(new Uint8Array(6));
    id = 'web-' + Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
    sessionStorage.setItem('sockhost-session', id);
  }
  return id;
}

// ---- start ------------------------------------------------------------------------------

/** Fills the selector from /addons.json and connects to the addon in the URL's #fragment,
 *  else aikefu, else the first one mounted. */
async function start() {
  $('session').value = sessionId();
  let list = { addons: [], dashboard: null };
  try {
    const response = await fetch('/addons.json', { cache: 'no-store' });
    if (!response.ok) {
      throw new Error(`HTTP ${response.status}`);
    }
    list = await response.json();
  } catch (err) {
    setStatus('error', `cannot list the addons (/addons.json): ${err.message}`);
    return;
  }
  const select = $('addon');
  for (const name of list.addons) {
    select.append(new Option(name, name));
  }
  $('dashboard-link').hidden = !list.dashboard;
  if (list.addons.length === 0) {
    setStatus('error', 'no addons are mounted');
    return;
  }
  const wanted = decodeURIComponent(location.hash.slice(1));
  const first = [wanted, 'aikefu'].find((name) => list.addons.includes(name)) ?? list.addons[0];
  select.value = first;
  connect(first);

  select.addEventListener('change', () => {
    history.replaceState(null, '', `#${encodeURIComponent(select.value)}`);
    connect(select.value);
  });
  $('reconnect').addEventListener('click', () => connect(select.value));
  $('chat-form').addEventListener('submit', (event) => {
    event.preventDefault();
    const input = $('chat-input');
    const text = input.value.trim();
    if (text === '') {
      return;
    }
    // The seed's chat message: all four fields, as the PHP server expected them.
    const message = {
      message: text,
      token: $('token').value,
      session_id: $('session').value,
      action: 'chat',
    };
    if (send(JSON.stringify(message))) {
      addMessage('user', text);
      input.value = '';
    }
  });
  $('raw-form').addEventListener('submit', (event) => {
    event.preventDefault();
    const input = $('raw-input');
    if (input.value !== '' && send(input.value)) {
      input.value = '';
    }
  });
  $('raw-clear').addEventListener('click', () => $('frames').replaceChildren());
}

start();
