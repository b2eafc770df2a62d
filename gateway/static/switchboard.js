// Switchboard browser client (protocol v1, docs/protocol.md): JSON text frames on GET /ws.
// Dependency-free ES module: `import { Switchboard } from './switchboard.js'`.

const BACKOFF_START_MS = 250;
const BACKOFF_MAX_MS = 30_000;
const STABLE_SESSION_MS = 30_000; // a session longer than this resets the backoff
const FLOOD_MIN_DELAY_MS = 5_000; // 4003: "a backoff of at least a few seconds"
const NO_RECONNECT = new Set([1000, 1003, 1007, 4001, 4004, 4005]);
const REPLIES = new Set(['ack', 'error', 'presence', 'pong']);

const fail = (code, message, extra) => Object.assign(new Error(message || code), { code }, extra);
const jitter = (ms) => Math.round(ms * (0.5 + Math.random())); // factor in [0.5, 1.5]

function defaultUrl() {
  const loc = globalThis.location;
  if (!loc) throw new Error('Switchboard: `url` is required outside a browser page');
  return `${loc.protocol === 'https:' ? 'wss:' : 'ws:'}//${loc.host}/ws`;
}

/**
 * Switchboard client with automatic reconnect, re-subscription and an offline command queue.
 *
 * Events (`on(event, fn)`): 'welcome', 'message', 'direct', 'join', 'leave' (the server frame),
 * 'open' ({reconnect}), 'close' ({code, reason, willReconnect, delayMs}), 'error' (an Error
 * with `.code`: server errors without a matching command, failed re-subscriptions, socket errors).
 */
export class Switchboard {
  /**
   * @param {object} [options]
   * @param {string} [options.url] ws:// or wss:// URL of /ws; default: this page's host, path /ws.
   * @param {string} [options.token] JWT, sent as `?token=`. After a 4001 close, set `client.token`
   *   to a fresh one and call `connect()` again.
   * @param {string} [options.user] user id for the gateway's anonymous demo mode (`?user=`).
   * @param {number} [options.maxQueue=1000] commands kept while disconnected; more are rejected.
   * @param {boolean} [options.autoConnect=true] connect from the constructor.
   */
  constructor({ url, token, user, maxQueue = 1000, autoConnect = true } = {}) {
    this.url = url || defaultUrl();
    this.token = token;
    this.user = user;
    this.maxQueue = maxQueue;
    /** 'idle' | 'connecting' | 'open' | 'reconnecting' | 'closed' */
    this.state = 'idle';
    /** The last `welcome` frame (user, conn_id, limits, …), or null before the first one. */
    this.welcome = null;
    this._ws = null;
    this._timer = null;
    this._stopped = false;
    this._ref = 0;
    this._attempt = 0;
    this._openedAt = 0;
    this._everOpened = false;
    this._pending = new Map(); // ref -> command sent, waiting for its reply
    this._queue = []; // commands waiting for an open socket
    this._subs = new Set(); // channels acked, re-subscribed after a reconnect
    this._listeners = new Map();
    if (autoConnect) this.connect();
  }

  /** Channels this client is subscribed to (acked), re-subscribed on every reconnect. */
  get subscriptions() {
    return [...this._subs];
  }

  /** Open the connection (again, e.g. after `close()` or a 4001 close). @returns {this} */
  connect() {
    this._stopped = false;
    if (!this._ws && !this._timer) this._open();
    return this;
  }

  /**
   * Close for good: no reconnect; queued and in-flight commands are rejected with code 'closed'.
   * @param {number} [code=1000] @param {string} [reason='']
   */
  close(code = 1000, reason = '') {
    this._stopped = true;
    clearTimeout(this._timer);
    this._timer = null;
    const ws = this._ws;
    if (!ws) {
      this.state = 'closed';
      return this._rejectAll(this._queue.splice(0), 'closed');
    }
    try { ws.close(code, reason); } finally { this._onClose(code, reason); } // final right now
  }

  /** Subscribe to a channel. @param {string} channel @returns {Promise<object>} the ack */
  subscribe(channel) {
    return this._command({ op: 'subscribe', channel }, (ack) => (this._subs.add(channel), ack));
  }

  /** Unsubscribe from a channel. @param {string} channel @returns {Promise<object>} the ack */
  unsubscribe(channel) {
    this._subs.delete(channel);
    return this._command({ op: 'unsubscribe', channel }, (ack) => (this._subs.delete(channel), ack));
  }

  /**
   * Publish to a channel. @param {string} channel @param {*} data any JSON value
   * @returns {Promise<{id: string, seq: number}>} the ack
   */
  publish(channel, data) {
    return this._command({ op: 'publish', channel, data });
  }

  /**
   * Send a direct message to every connection of a user. @param {string} user @param {*} data
   * @returns {Promise<{id: string, delivered?: number}>} the ack
   */
  send(user, data) {
    return this._command({ op: 'send', user, data });
  }

  /** Users subscribed to a presence channel. @param {string} channel @returns {Promise<string[]>} */
  presence(channel) {
    return this._command({ op: 'presence', channel }, (reply) => reply.users || []);
  }

  /** Application-level ping. @returns {Promise<number>} round-trip time in ms */
  ping() {
    const t0 = Date.now();
    return this._command({ op: 'ping' }, () => Date.now() - t0);
  }

  /** Add a listener. @param {string} event @param {Function} fn @returns {this} */
  on(event, fn) {
    if (!this._listeners.has(event)) this._listeners.set(event, new Set());
    this._listeners.get(event).add(fn);
    return this;
  }

  /** Remove a listener. @param {string} event @param {Function} fn @returns {this} */
  off(event, fn) {
    this._listeners.get(event)?.delete(fn);
    return this;
  }

  _emit(event, payload) {
    for (const fn of [...(this._listeners.get(event) || [])]) {
      try { fn(payload); } catch (err) { console.error(`Switchboard '${event}' listener:`, err); }
    }
  }

  _command(frame, map = (reply) => reply) {
    return new Promise((resolve, reject) => {
      if (this.state === 'closed') return reject(fail('closed', 'Switchboard client is closed'));
      const ref = String(++this._ref);
      const cmd = { ref, frame: { ...frame, ref }, map, resolve, reject };
      if (this._ws?.readyState === WebSocket.OPEN) this._transmit(cmd);
      else if (this._queue.length >= this.maxQueue) reject(fail('queue_full', 'offline queue is full'));
      else this._queue.push(cmd);
    });
  }

  _transmit(cmd) {
    const text = JSON.stringify(cmd.frame);
    const max = this.welcome?.limits?.max_message_bytes;
    if (max && new TextEncoder().encode(text).length > max) {
      // The server would close the whole session with 1009.
      return cmd.reject(fail('message_too_big', `frame over ${max} bytes`));
    }
    this._pending.set(cmd.ref, cmd);
    this._ws.send(text);
  }

  _open() {
    this._timer = null;
    this.state = 'connecting';
    const url = new URL(this.url, globalThis.location?.href);
    if (this.token) url.searchParams.set('token', this.token);
    if (this.user) url.searchParams.set('user', this.user);
    const ws = (this._ws = new WebSocket(url));
    const live = (fn) => (ev) => ws === this._ws && fn(ev); // ignore a socket left by close()
    ws.onopen = live(() => {
      this.state = 'open';
      this._openedAt = Date.now();
      for (const channel of this._subs) {
        this.subscribe(channel).catch((err) => {
          if (err.code === 'disconnected' || err.code === 'closed') return;
          this._subs.delete(channel);
          this._emit('error', Object.assign(err, { channel }));
        });
      }
      const queued = this._queue.splice(0);
      for (const cmd of queued) this._transmit(cmd);
      this._emit('open', { reconnect: this._everOpened });
      this._everOpened = true;
    });
    ws.onmessage = live((ev) => this._onFrame(ev.data));
    ws.onerror = live(() => this._emit('error', fail('socket_error', `WebSocket error on ${url.origin}`)));
    ws.onclose = live((ev) => this._onClose(ev.code, ev.reason || ''));
  }

  _onFrame(text) {
    let msg;
    try { msg = JSON.parse(text); } catch { return this._emit('error', fail('bad_frame', 'unparsable frame')); }
    if (!msg || typeof msg !== 'object') return;
    const cmd = REPLIES.has(msg.type) && msg.ref != null && this._pending.get(String(msg.ref));
    if (cmd) {
      this._pending.delete(cmd.ref);
      if (msg.type === 'error') {
        cmd.reject(fail(msg.code, msg.message, { retryAfterMs: msg.retry_after_ms, frame: msg }));
      } else {
        cmd.resolve(cmd.map(msg));
      }
      return;
    }
    if (msg.type === 'welcome') this.welcome = msg;
    if (msg.type === 'error') {
      this._emit('error', fail(msg.code, msg.message, { retryAfterMs: msg.retry_after_ms, frame: msg }));
    } else {
      this._emit(msg.type, msg);
    }
  }

  _onClose(code, reason) {
    const lived = this._openedAt ? Date.now() - this._openedAt : 0;
    this._ws = null;
    this._openedAt = 0;
    const why = this._stopped ? 'closed' : 'disconnected';
    this._rejectAll([...this._pending.values()], why, `connection closed (${code})`);
    this._pending.clear();
    if (lived > STABLE_SESSION_MS) this._attempt = 0;
    const retry = !this._stopped && (code === 4004 ? /reconnect/.test(reason) : !NO_RECONNECT.has(code));
    const delayMs = retry ? this._nextDelay(code, reason) : null;
    if (retry) {
      this.state = 'reconnecting';
      this._timer = setTimeout(() => this._open(), delayMs);
    } else {
      this.state = 'closed';
      this._rejectAll(this._queue.splice(0), 'closed', `connection closed (${code})`);
    }
    this._emit('close', { code, reason, willReconnect: retry, delayMs });
  }

  _nextDelay(code, reason) {
    const hint = code === 1001 && /retry_ms=(\d+)/.exec(reason);
    if (hint) return jitter(Number(hint[1]));
    if (code === 4000 && this._attempt === 0) {
      this._attempt = 1; // 4000: immediately, then with backoff
      return 0;
    }
    const base = Math.min(BACKOFF_MAX_MS, BACKOFF_START_MS * 2 ** this._attempt);
    this._attempt = Math.min(this._attempt + 1, 20);
    return Math.max(jitter(base), code === 4003 ? FLOOD_MIN_DELAY_MS : 0);
  }

  _rejectAll(cmds, code, message = 'Switchboard client is closed') {
    for (const cmd of cmds) cmd.reject(fail(code, message));
  }
}

export default Switchboard;
