// Switchboard browser client (protocol v1, docs/protocol.md): JSON text frames on GET /ws,
// or, where WebSockets are refused, Server-Sent Events (GET /sse) or long-polling (/poll)
// with commands over POST /command.
// Dependency-free ES module: `import { Switchboard } from './switchboard.js'`.
// Runs in browsers and in Node 20 (pass the `ws` package's class as option `WebSocket`).

const BACKOFF_START_MS = 250;
const BACKOFF_MAX_MS = 30_000;
const STABLE_SESSION_MS = 30_000; // a session longer than this resets the backoff
const FLOOD_MIN_DELAY_MS = 5_000; // 4003: "a backoff of at least a few seconds"
const REFRESH_SHARE = 0.8; // refresh the token at 80% of its remaining lifetime…
const REFRESH_MARGIN_MS = 5_000; // …and at least 5 s before it expires
const REFRESH_RETRY_MS = 2_000; // a failed refresh is retried after this (while time is left)
const MAX_TIMER_MS = 2 ** 31 - 1; // setTimeout's limit
const RECOVERY_RETRY_MS = 500; // first retry of a recovery answered `unavailable`, then doubled
const NO_RECONNECT = new Set([1000, 1003, 1007, 4001, 4004, 4005]);
// Closes after which the next URL of the list is tried (the gateway went away, drains, or the
// network failed); after others (token expiry, slow consumer, flood, …) the same one is.
const ROTATE = new Set([1001, 1006, 1011, 1012, 1013, 1014, 4000]);
const REFRESH_UNSUPPORTED = new Set(['unknown_op', 'bad_request']); // no refresh on this session
const REPLIES = new Set(['ack', 'error', 'presence', 'pong', 'history']);
const OPEN = 1; // WebSocket.OPEN
const TRANSPORTS = ['websocket', 'sse', 'poll'];
const CONNECT_TIMEOUT_MS = 10_000; // a connection that gave no session by then failed
const UPGRADE_RETRY_MS = 60_000; // on a fallback transport, WebSocket is tried again after this

const fail = (code, message, extra) => Object.assign(new Error(message || code), { code }, extra);
const jitter = (ms) => Math.round(ms * (0.5 + Math.random())); // factor in [0.5, 1.5]
const copy = (p) => (p ? { seq: p.seq, epoch: p.epoch } : null);
const isPosition = (p) => !!p && typeof p === 'object' && Number.isFinite(p.seq) && typeof p.epoch === 'string' && p.epoch !== '';

function defaultUrl() {
  const loc = globalThis.location;
  if (!loc) throw new Error('Switchboard: `url` is required outside a browser page');
  return `${loc.protocol === 'https:' ? 'wss:' : 'ws:'}//${loc.host}/ws`;
}

/**
 * Switchboard client with automatic reconnect, resumption at the last position of every
 * channel, token refresh and an offline command queue.
 *
 * Events (`on(event, fn)`): 'welcome', 'message', 'direct', 'broadcast', 'join', 'leave',
 * 'presence_count' (the server frame); 'open' ({reconnect, url}) when the socket opened;
 * 'close' ({code, reason, willReconnect, delayMs}); 'gap' ({channel, reason, from, position}):
 * messages of `channel` after `from` may have been missed (the gateway could not recover
 * them: the subscribe ack's `reason`, the `gap` frame's, or 'no_position' when a channel was
 * re-subscribed without any position known), the stream goes on after `position`: reload
 * the channel's state (e.g. `history()`);
 * 'refresh' ({expires_at, revoked}) after an accepted token refresh; 'revoked' ({channels})
 * when a refreshed token no longer allows some subscriptions (they are dropped);
 * 'error' (an Error with `.code`: server errors without a matching command, failed
 * re-subscriptions (`.channel`), failed refreshes, getToken failures, socket errors).
 */
export class Switchboard {
  /**
   * @param {object} [options]
   * @param {string|string[]} [options.url] ws:// or wss:// URL of /ws, or a list of them (the
   *   client moves to the next one when a connection fails or the gateway goes away: close
   *   1001, 1006, 1011-1014, 4000); default: this page's host, path /ws.
   * @param {string[]} [options.urls] same as a list in `url`.
   * @param {() => (string|Promise<string>)} [options.getToken] returns a JWT (sync or async);
   *   called for every connection and before the session's token expires (refresh).
   * @param {string} [options.token] a fixed JWT (used when there is no `getToken`). After a 4001
   *   close, set `client.token` to a fresh one and call `connect()` again.
   * @param {'auto'|'connect'|'protocol'|'query'} [options.auth='auto'] how a token is sent:
   *   'connect' as the first message (keeps it out of URLs and headers), 'protocol' in
   *   `Sec-WebSocket-Protocol: switchboard.v1, bearer.<jwt>`, 'query' as `?token=`; 'auto'
   *   tries 'connect' and falls back to 'protocol' for gateways that do not support it.
   * @param {string} [options.user] user id for the gateway's anonymous demo mode (`?user=`).
   * @param {number} [options.maxQueue=1000] commands kept while disconnected; more are rejected.
   * @param {boolean} [options.autoConnect=true] connect from the constructor.
   * @param {number} [options.recoveryRetries=5] times a recovery answered `unavailable` (the
   *   history could not be read now) is tried again, after 0.5 s, 1 s, 2 s, … (jittered),
   *   before it is reported as a 'gap'.
   * @param {Function} [options.WebSocket] WebSocket class (default: the global one), e.g. the
   *   `ws` package's in Node.
   * @param {('websocket'|'sse'|'poll')[]} [options.transports=['websocket','sse','poll']] the
   *   transports to try, in order. When a connection fails before it opened (the upgrade
   *   refused or dropped, or nothing within `connectTimeoutMs`), the next one is tried at
   *   once on the same gateway; when all failed, the first again after a backoff. A session
   *   on a fallback transport tries WebSocket again every `upgradeRetryMs` (and on every
   *   reconnect) and moves back to it when an upgrade succeeds. The API and the events are
   *   the same on every transport ('open' and 'welcome' name it: `transport`).
   * @param {number} [options.connectTimeoutMs=10000] a connection attempt that gave no
   *   session by then failed (e.g. a proxy that holds the upgrade, or buffers the SSE stream).
   * @param {number} [options.upgradeRetryMs=60000] see `transports`.
   * @param {Function} [options.fetch] fetch function for the HTTP transports (default: the global one).
   */
  constructor({ url, urls, token, getToken, auth = 'auto', user, maxQueue = 1000, autoConnect = true,
    recoveryRetries = 5, WebSocket: WebSocketImpl, transports = TRANSPORTS, connectTimeoutMs = CONNECT_TIMEOUT_MS,
    upgradeRetryMs = UPGRADE_RETRY_MS, fetch: fetchImpl } = {}) {
    this.recoveryRetries = recoveryRetries;
    this.transports = [].concat(transports).filter((t) => TRANSPORTS.includes(t));
    if (!this.transports.length) throw new Error(`Switchboard: transports must name some of ${TRANSPORTS.join(', ')}`);
    this.connectTimeoutMs = connectTimeoutMs;
    this.upgradeRetryMs = upgradeRetryMs;
    this.fetch = fetchImpl || globalThis.fetch?.bind(globalThis);
    /** The transport of the current (or next) connection. */
    this.transport = this.transports[0];
    this._failedTransports = []; // transports that failed before the current one, this try
    this._broken = new Map(); // `${url} ${transport}` -> until when it is skipped
    const list = [].concat(urls || url || []).filter(Boolean);
    this.urls = list.length ? list : [defaultUrl()];
    this.token = token;
    this.getToken = getToken;
    this.auth = auth;
    this.user = user;
    this.maxQueue = maxQueue;
    this.WebSocket = WebSocketImpl || globalThis.WebSocket;
    if (!this.WebSocket && this.transports.includes('websocket')) {
      throw new Error('Switchboard: no WebSocket class (pass option `WebSocket`)');
    }
    if (!this.fetch && this.transports.some((t) => t !== 'websocket')) {
      throw new Error('Switchboard: no fetch function for the HTTP transports (pass option `fetch`)');
    }
    /** 'idle' | 'connecting' | 'open' | 'reconnecting' | 'closed' */
    this.state = 'idle';
    /** The last `welcome` frame (user, conn_id, limits, expires_at, …), or null before the first one. */
    this.welcome = null;
    /** Sockets opened after the first one. */
    this.reconnects = 0;
    this._urlIndex = 0;
    this._ws = null;
    this._ready = false; // welcome received on the current socket
    this._timer = null;
    this._refreshTimer = null;
    this._opening = 0; // generation of the current _open (getToken may be pending)
    this._stopped = false;
    this._ref = 0;
    this._attempt = 0;
    this._openedAt = 0;
    this._everOpened = false;
    this._authModes = new Map(); // url -> 'connect' | 'protocol' once one worked there
    this._defaultMode = 'connect'; // for other URLs ('protocol' after a gateway refused 'connect')
    this._connectRef = null; // ref of the pending `connect` on this socket
    this._tokenSession = false; // this session was authenticated with a token
    this._pending = new Map(); // ref -> command sent, waiting for its reply
    this._queue = []; // commands waiting for a ready session
    this._subs = new Set(); // channels acked, re-subscribed after a reconnect
    this._positions = new Map(); // channel -> {seq, epoch} of the last message delivered
    this._holding = new Set(); // channels whose live messages wait for a retried recovery
    this._recoveryRetries = new Map(); // channel -> recoveries retried after `unavailable`
    this._retryTimers = new Set();
    this._listeners = new Map();
    if (autoConnect) this.connect();
  }

  /** The URL of the current (or next) connection. */
  get url() {
    return this.urls[this._urlIndex % this.urls.length];
  }

  set url(value) {
    this.urls = [value];
    this._urlIndex = 0;
  }

  /** Channels this client is subscribed to (acked), re-subscribed on every reconnect. */
  get subscriptions() {
    return [...this._subs];
  }

  /**
   * The position of the last message of `channel` delivered to the application (or the
   * channel's position at subscription when none came yet): where a reconnect resumes.
   * @param {string} channel @returns {{seq: number, epoch: string} | null}
   */
  position(channel) {
    return copy(this._positions.get(channel));
  }

  /** Open the connection (again, e.g. after `close()` or a 4001 close). @returns {this} */
  connect() {
    this._stopped = false;
    if (!this._ws && !this._timer && !this._opening) this._open();
    return this;
  }

  /**
   * Close for good: no reconnect; queued and in-flight commands are rejected with code 'closed'.
   * @param {number} [code=1000] @param {string} [reason='']
   */
  close(code = 1000, reason = '') {
    this._stopped = true;
    this._opening = 0;
    clearTimeout(this._timer);
    this._timer = null;
    const ws = this._ws;
    if (!ws) {
      this.state = 'closed';
      this._clearRefresh();
      return this._rejectAll(this._queue.splice(0), 'closed');
    }
    try { ws.close(code, reason); } catch { /* already closing */ } finally { this._onClose(code, reason); }
  }

  /**
   * Subscribe to a channel. Resumes after `since` (default: the position this client holds
   * for the channel, if any): the messages missed since then are delivered first, or a 'gap'
   * event says why they cannot be.
   * @param {string} channel @param {{since?: {seq: number, epoch: string}}} [options]
   * @returns {Promise<object>} the ack
   */
  subscribe(channel, { since } = {}) {
    const cmd = this._command({ op: 'subscribe', channel }, (ack, frame) => {
      this._subs.add(channel);
      this._subscribed(channel, frame.since || null, ack);
      return ack;
    }, (frame) => {
      const from = isPosition(since) ? since : this._positions.get(channel);
      if (from) frame.since = copy(from);
    });
    return cmd;
  }

  /** Unsubscribe from a channel (and forget its position). @param {string} channel @returns {Promise<object>} the ack */
  unsubscribe(channel) {
    this._subs.delete(channel);
    this._positions.delete(channel);
    this._holding.delete(channel);
    this._recoveryRetries.delete(channel);
    return this._command({ op: 'unsubscribe', channel }, (ack) => (this._subs.delete(channel), ack));
  }

  /**
   * Publish to a channel. @param {string} channel @param {*} data any JSON value
   * @param {{idempotencyKey?: string}} [options]
   * @returns {Promise<{id: string, seq: number}>} the ack
   */
  publish(channel, data, { idempotencyKey } = {}) {
    const frame = { op: 'publish', channel, data };
    if (idempotencyKey) frame.idempotency_key = idempotencyKey;
    return this._command(frame);
  }

  /**
   * Send a direct message to every connection of a user. @param {string} user @param {*} data
   * @returns {Promise<{id: string, delivered?: number}>} the ack
   */
  send(user, data) {
    return this._command({ op: 'send', user, data });
  }

  /**
   * A channel's history: the newest `limit` messages, or the first `limit` after `since`.
   * @param {string} channel @param {{limit?: number, since?: {seq: number, epoch: string}}} [options]
   * @returns {Promise<{messages: object[], position?: object, more: boolean, lost?: string}>}
   *   the `history` reply
   */
  history(channel, { limit, since } = {}) {
    const frame = { op: 'history', channel };
    if (limit != null) frame.limit = limit;
    if (since) frame.since = copy(since);
    return this._command(frame);
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

  /**
   * Replace the session's token now (done by itself before `expires_at` with `getToken`).
   * @param {string} [token] default: a fresh one from `getToken` (or `client.token`)
   * @returns {Promise<{expires_at: number, revoked?: string[]}>} the ack
   */
  async refresh(token) {
    const jwt = token || (await this._token());
    if (!jwt) throw fail('no_token', 'no token to refresh with');
    return this._command({ op: 'refresh', token: jwt }, (ack) => {
      if (ack.expires_at) {
        if (this.welcome) this.welcome = { ...this.welcome, expires_at: ack.expires_at };
        this._scheduleRefresh(ack.expires_at);
      }
      const revoked = Array.isArray(ack.revoked) ? ack.revoked : [];
      for (const channel of revoked) {
        this._subs.delete(channel);
        this._positions.delete(channel);
      }
      this._emit('refresh', { expires_at: ack.expires_at, revoked });
      if (revoked.length) this._emit('revoked', { channels: revoked });
      return ack;
    });
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

  /** `prepare(frame)` completes the frame when it is sent; `map(reply, frame)` maps the reply. */
  _command(frame, map = (reply) => reply, prepare = null) {
    return new Promise((resolve, reject) => {
      if (this.state === 'closed') return reject(fail('closed', 'Switchboard client is closed'));
      const ref = String(++this._ref);
      const cmd = { ref, frame: { ...frame, ref }, map, prepare, resolve, reject };
      if (this._ready && this._ws?.readyState === OPEN) this._transmit(cmd);
      else if (this._queue.length >= this.maxQueue) reject(fail('queue_full', 'offline queue is full'));
      else this._queue.push(cmd);
    });
  }

  _transmit(cmd) {
    if (cmd.prepare) cmd.prepare(cmd.frame);
    const text = JSON.stringify(cmd.frame);
    const max = this.welcome?.limits?.max_message_bytes;
    if (max && new TextEncoder().encode(text).length > max) {
      // The server would close the whole session with 1009.
      return cmd.reject(fail('message_too_big', `frame over ${max} bytes`));
    }
    this._pending.set(cmd.ref, cmd);
    this._ws.send(text);
  }

  async _token() {
    if (this.getToken) return await this.getToken();
    return this.token;
  }

  /** How the token goes to `url`: 'connect' | 'protocol' | 'query'. */
  _authMode(url) {
    if (this.auth !== 'auto') return this.auth;
    return this._authModes.get(url) || this._defaultMode;
  }

  async _open() {
    clearTimeout(this._timer);
    this._timer = null;
    const generation = (this._generation = (this._generation || 0) + 1);
    this._opening = generation;
    this.state = this._everOpened ? 'reconnecting' : 'connecting';
    const base = this.url;
    let token;
    try {
      token = this.getToken || this.token ? await this._token() : undefined;
    } catch (err) {
      if (generation !== this._opening || this._stopped) return;
      this._opening = 0;
      this._emit('error', fail('token_error', `getToken failed: ${err?.message || err}`, { cause: err }));
      return this._scheduleReconnect(null);
    }
    if (generation !== this._opening || this._stopped) return; // close() or another open meanwhile
    this._opening = 0;
    this.state = 'connecting';
    const url = new URL(base, globalThis.location?.href);
    if (this.user) url.searchParams.set('user', this.user);
    const transport = this.transport;
    let ws;
    let mode = null;
    if (transport === 'websocket') {
      mode = token ? this._authMode(base) : null;
      let protocols;
      if (mode === 'query') url.searchParams.set('token', token);
      if (mode === 'protocol') protocols = ['switchboard.v1', `bearer.${token}`];
      ws = protocols ? new this.WebSocket(url.href, protocols) : new this.WebSocket(url.href);
    } else {
      const Link = transport === 'sse' ? SseLink : PollLink;
      ws = new Link(this, url, token);
    }
    this._ws = ws;
    this._ready = false;
    this._connectRef = null;
    this._tokenSession = !!token;
    this._sessionUrl = base;
    this._sessionMode = mode;
    const live = (fn) => (ev) => ws === this._ws && fn(ev); // ignore a socket left by close()
    clearTimeout(this._connectTimer);
    this._connectTimer = setTimeout(live(() => {
      if (this._ready) return;
      // No session in time: a failure of this transport (not opened, whatever the socket says).
      this._ws = null;
      this._openedAt = 0;
      try { ws.close(1000, 'connect timeout'); } catch { /* closing */ }
      this._onClose(1006, 'connect timeout');
    }), this.connectTimeoutMs);
    ws.onopen = live(() => {
      this._openedAt = Date.now();
      if (this._everOpened) this.reconnects++;
      this._emit('open', { reconnect: this._everOpened, url: base, transport });
      this._everOpened = true;
      if (mode === 'connect') {
        this._connectRef = `c${++this._ref}`;
        ws.send(JSON.stringify({ op: 'connect', token, ref: this._connectRef }));
      }
    });
    ws.onmessage = live((ev) => this._onFrame(typeof ev.data === 'string' ? ev.data : String(ev.data)));
    ws.onerror = live(() => {
      // A token-less upgrade to a gateway that may predate `connect`: retried at once (_onClose).
      if (mode === 'connect' && !this._openedAt && this.auth === 'auto' && !this._authModes.has(base)) return;
      this._emit('error', fail('socket_error', `WebSocket error on ${url.origin}`));
    });
    ws.onclose = live((ev) => this._onClose(ev.code, ev.reason || ''));
  }

  /** The session is authenticated (welcome): re-subscribe, send the queue, plan the refresh. */
  _onWelcome(msg) {
    if (this._sessionMode && this.auth === 'auto') {
      this._authModes.set(this._sessionUrl, this._sessionMode);
      if (this._sessionMode === 'connect') this._defaultMode = 'connect';
    }
    clearTimeout(this._connectTimer);
    this._ready = true;
    this.state = 'open';
    this.welcome = msg;
    this._startWatchdog(msg);
    // The transports that failed before this one are skipped on this gateway's reconnects
    // until the next upgrade probe (they would fail again, a timeout each time).
    for (const t of this._failedTransports) this._broken.set(`${this._sessionUrl} ${t}`, Date.now() + this.upgradeRetryMs);
    this._failedTransports = [];
    this._planUpgrade();
    for (const channel of this._subs) {
      const known = this._positions.has(channel);
      this.subscribe(channel).then((ack) => {
        // No position to resume from (none came with the first ack nor since): what was
        // published while disconnected cannot be recovered.
        if (!known && ack.recovered === undefined) {
          this._emit('gap', { channel, reason: 'no_position', from: null, position: this.position(channel) });
        }
      }, (err) => {
        if (err.code === 'disconnected' || err.code === 'closed') return;
        this._subs.delete(channel);
        this._positions.delete(channel);
        this._emit('error', Object.assign(err, { channel }));
      });
    }
    const queued = this._queue.splice(0);
    for (const cmd of queued) this._transmit(cmd);
    if (this._tokenSession && msg.expires_at) this._scheduleRefresh(msg.expires_at);
    else this._clearRefresh();
    this._emit('welcome', msg);
  }

  /** A subscribe ack: where the channel's stream continues, and the gap when it does not. */
  _subscribed(channel, since, ack) {
    const at = isPosition(ack.position) ? copy(ack.position) : null;
    this._holding.delete(channel);
    if (ack.recovered === false && ack.reason === 'unavailable' && since && this._retryRecovery(channel, since)) return;
    if (ack.recovered !== false) this._recoveryRetries.delete(channel);
    if (ack.recovered === false) {
      if (at) this._positions.set(channel, at);
      else this._positions.delete(channel);
      this._emit('gap', { channel, reason: ack.reason || 'unknown', from: copy(since), position: copy(at) });
    } else if (ack.recovered === true) {
      // The missed messages follow (the ack's position is the channel's head, not ours).
      if (since && !this._positions.has(channel)) this._positions.set(channel, copy(since));
    } else if (at) {
      this._positions.set(channel, at);
    }
  }

  /**
   * The history could not be read now (`unavailable`): "resubscribing later may recover".
   * Keeps `since`, drops the channel's live messages meanwhile (they come after `since`: the
   * next recovery brings them, in order) and subscribes again with `since` after a backoff;
   * false (a gap, then) once `recoveryRetries` attempts were made.
   */
  _retryRecovery(channel, since) {
    const n = this._recoveryRetries.get(channel) || 0;
    if (n >= this.recoveryRetries) {
      this._recoveryRetries.delete(channel);
      return false;
    }
    this._recoveryRetries.set(channel, n + 1);
    this._positions.set(channel, copy(since));
    this._holding.add(channel);
    const ws = this._ws;
    const timer = setTimeout(() => {
      this._retryTimers.delete(timer);
      // A reconnect meanwhile subscribes with `since` by itself.
      if (ws !== this._ws || !this._ready || !this._subs.has(channel)) return;
      this._command({ op: 'unsubscribe', channel }).catch(() => {});
      this.subscribe(channel).catch(() => {}); // failures: as for any re-subscription
    }, jitter(RECOVERY_RETRY_MS * 2 ** n));
    this._retryTimers.add(timer);
    return true;
  }

  /**
   * Browsers (and `ws` through this API) do not show the server's WebSocket pings, so a
   * connection that died without a close (a lost network) would look open for minutes: after
   * `heartbeat_ms` without any frame the client sends a `ping`, and when nothing came
   * `heartbeat_timeout_ms` later it drops the socket and reconnects (close code 4000).
   */
  _startWatchdog(welcome) {
    clearInterval(this._watchdog);
    const idle = Number(welcome.heartbeat_ms) || 25_000;
    const grace = Number(welcome.heartbeat_timeout_ms) || 10_000;
    const ws = this._ws;
    let probeAt = 0;
    this._watchdog = setInterval(() => {
      if (ws !== this._ws || !this._ready) return clearInterval(this._watchdog);
      const now = Date.now();
      if (now - this._lastFrameAt < idle) { probeAt = 0; return; }
      if (!probeAt) {
        probeAt = now;
        try { ws.send(JSON.stringify({ op: 'ping', ref: `w${++this._ref}` })); } catch { /* closing */ }
      } else if (now - probeAt >= grace) {
        clearInterval(this._watchdog);
        this._ws = null; // its close event, whenever it comes, is not ours any more
        try { ws.close(4000, 'no traffic'); } catch { /* closing */ }
        this._onClose(4000, 'client heartbeat timeout');
      }
    }, Math.max(50, Math.min(idle, grace) / 4));
  }

  _onFrame(text) {
    this._lastFrameAt = Date.now();
    let msg;
    try { msg = JSON.parse(text); } catch { return this._emit('error', fail('bad_frame', 'unparsable frame')); }
    if (!msg || typeof msg !== 'object') return;
    if (msg.type === 'welcome') {
      if (this._connectRef && String(msg.ref) !== this._connectRef) {
        // Admitted without a token (a gateway without `connect`, or anonymous mode): the
        // token would not apply. Go again with the token in the upgrade request.
        return this._fallback();
      }
      this._connectRef = null;
      return this._onWelcome(msg);
    }
    if (msg.type === 'pong' && /^w\d+$/.test(String(msg.ref))) return; // the watchdog's
    const cmd = REPLIES.has(msg.type) && msg.ref != null && this._pending.get(String(msg.ref));
    if (cmd) {
      this._pending.delete(cmd.ref);
      if (msg.type === 'error') {
        cmd.reject(fail(msg.code, msg.message, { retryAfterMs: msg.retry_after_ms, frame: msg }));
      } else {
        let value;
        try { value = cmd.map(msg, cmd.frame); } catch (err) { return cmd.reject(err); }
        cmd.resolve(value);
      }
      return;
    }
    if (msg.type === 'error') {
      if (this._connectRef && String(msg.ref) === this._connectRef) return; // handled by the welcome
      this._emit('error', fail(msg.code, msg.message, { retryAfterMs: msg.retry_after_ms, frame: msg }));
      return;
    }
    if (msg.type === 'message' && typeof msg.channel === 'string') {
      if (this._holding.has(msg.channel)) return; // recovered again after `since` (_retryRecovery)
      if (!this._track(msg)) return; // a duplicate
    } else if (msg.type === 'gap' && typeof msg.channel === 'string') {
      const from = this.position(msg.channel);
      const after = isPosition(msg.after) ? copy(msg.after) : null;
      if (msg.reason === 'unavailable' && after && this._subs.has(msg.channel) && this._retryRecovery(msg.channel, after)) return;
      if (after && (!from || from.epoch !== after.epoch || after.seq > from.seq)) this._positions.set(msg.channel, after);
      this._emit('gap', { channel: msg.channel, reason: msg.reason || 'unknown', from, position: after });
      return;
    }
    this._emit(msg.type, msg);
  }

  /** Records a message's position; false for one at or before the last one of its epoch. */
  _track(msg) {
    if (!isPosition(msg)) return true; // a gateway without positions
    const channel = msg.channel;
    const last = this._positions.get(channel);
    if (last && last.epoch === msg.epoch && msg.seq <= last.seq) return false;
    if (last || this._subs.has(channel) || this._isSubscribing(channel)) {
      this._positions.set(channel, { seq: msg.seq, epoch: msg.epoch });
    }
    return true;
  }

  _isSubscribing(channel) {
    for (const cmd of this._pending.values()) {
      if (cmd.frame.op === 'subscribe' && cmd.frame.channel === channel) return true;
    }
    return false;
  }

  /** Reconnect at once with the token in the upgrade request. */
  _fallback() {
    const ws = this._ws;
    this._authModes.set(this._sessionUrl, 'protocol');
    this._defaultMode = 'protocol';
    this._ws = null;
    this._ready = false;
    this._connectRef = null;
    try { ws.close(1000, 'auth fallback'); } catch { /* closing */ }
    this._open();
  }

  /** The first transport of the list not known to fail on `url` (else the first). */
  _firstTransport(url) {
    const now = Date.now();
    const ok = this.transports.find((t) => !((this._broken.get(`${url} ${t}`) || 0) > now));
    return ok || this.transports[0];
  }

  /**
   * On a fallback transport: every `upgradeRetryMs`, a token-less WebSocket upgrade to the
   * same gateway; when it opens, this session is closed and the client reconnects at once
   * over WebSocket (resuming every channel, so nothing is lost or shown twice).
   */
  _planUpgrade() {
    clearTimeout(this._upgradeTimer);
    const link = this._ws;
    if (this.transport === this.transports[0] || this.transports[0] !== 'websocket' || !this.WebSocket) return;
    this._upgradeTimer = setTimeout(() => {
      if (link !== this._ws || !this._ready) return;
      const url = new URL(this._sessionUrl, globalThis.location?.href);
      if (this.user) url.searchParams.set('user', this.user);
      let probe;
      try { probe = new this.WebSocket(url.href); } catch { return this._planUpgrade(); }
      // Through only when a frame comes back (a proxy may answer 101 and pass nothing), in
      // the connect timeout (a proxy may hold the upgrade).
      const timer = setTimeout(() => done(false), this.connectTimeoutMs);
      const done = (opened) => {
        clearTimeout(timer);
        probe.onopen = probe.onclose = probe.onerror = probe.onmessage = null;
        try { probe.close(1000, 'probe'); } catch { /* closing */ }
        if (link !== this._ws || !this._ready) return;
        if (!opened) return this._planUpgrade();
        for (const t of this.transports) this._broken.delete(`${this._sessionUrl} ${t}`);
        this.transport = this.transports[0];
        this._ws = null;
        try { link.close(1000, 'upgrade'); } catch { /* closing */ }
        this._upgrading = true;
        this._onClose(4000, 'upgrade to websocket');
      };
      // A token-less session answers a first message that is not `connect` by closing 4005
      // (`connect required`), an anonymous one with its welcome: either is a frame through.
      probe.onopen = () => { try { probe.send(JSON.stringify({ op: 'ping', ref: 'probe' })); } catch { done(false); } };
      probe.onmessage = () => done(true);
      probe.onclose = (e) => done(e?.code === 4005);
      probe.onerror = () => done(false);
    }, jitter(this.upgradeRetryMs));
  }

  _onClose(code, reason) {
    clearInterval(this._watchdog);
    clearTimeout(this._connectTimer);
    clearTimeout(this._upgradeTimer);
    for (const timer of this._retryTimers) clearTimeout(timer);
    this._retryTimers.clear();
    const lived = this._openedAt ? Date.now() - this._openedAt : 0;
    const opened = !!this._openedAt;
    const welcomed = this._ready;
    this._ws = null;
    this._ready = false;
    this._openedAt = 0;
    const why = this._stopped ? 'closed' : 'disconnected';
    this._rejectAll([...this._pending.values()], why, `connection closed (${code})`);
    this._pending.clear();
    // A token-less upgrade refused before the socket opened: the gateway predates `connect`
    // (401). Go again at once to the same URL with the token in the upgrade request, and
    // use that by default from now on (until a gateway welcomes a `connect`).
    const probe = !opened && !this._stopped && this.auth === 'auto' && this._sessionMode === 'connect'
      && !this._authModes.has(this._sessionUrl);
    if (probe) this._defaultMode = 'protocol';
    if (lived > STABLE_SESSION_MS) this._attempt = 0;
    const renewable = !!this.getToken;
    let retry = !this._stopped;
    if (retry) {
      if (code === 4004) retry = /reconnect/.test(reason);
      else if (code === 4001 || code === 4005) retry = renewable;
      else retry = !NO_RECONNECT.has(code);
    }
    let delayMs = null;
    // A transport that gave no session (not opened): the next one of the list, at once, on
    // the same gateway; after the last, the first again with the usual backoff. One that
    // did: the next connection tries the first one again.
    const index = this.transports.indexOf(this.transport);
    const fallback = retry && !probe && !opened && code !== 1013 && !this._upgrading && index + 1 < this.transports.length;
    if (retry && !probe) {
      if (fallback) this._failedTransports.push(this.transport);
      else this._failedTransports = [];
      if (fallback) this.transport = this.transports[index + 1];
    }
    if (probe) {
      delayMs = 0;
      this._scheduleReconnect(delayMs);
    } else if (fallback) {
      delayMs = 0;
      this._scheduleReconnect(delayMs);
    } else if (retry) {
      delayMs = (code === 4001 && welcomed) || this._upgrading ? 0 : this._nextDelay(code, reason);
      // Another gateway of the list when this one seems gone; the same one otherwise (and
      // after a move back to WebSocket, whose probe went to this one).
      if (!this._upgrading && (!opened || ROTATE.has(code))) this._urlIndex = (this._urlIndex + 1) % this.urls.length;
      this._upgrading = false;
      this.transport = this._firstTransport(this.url);
      this._scheduleReconnect(delayMs);
    } else {
      this.state = 'closed';
      this._clearRefresh();
      this._rejectAll(this._queue.splice(0), 'closed', `connection closed (${code})`);
    }
    this._emit('close', { code, reason, willReconnect: retry || probe, delayMs, opened });
  }

  _scheduleReconnect(delayMs) {
    if (delayMs == null) delayMs = this._nextDelay(1006, '');
    this.state = 'reconnecting';
    clearTimeout(this._timer);
    this._timer = setTimeout(() => this._open(), delayMs);
  }

  _clearRefresh() {
    clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
  }

  /** Plans a token refresh before `expiresAt` (unix seconds); retried until it is accepted. */
  _scheduleRefresh(expiresAt) {
    this._clearRefresh();
    if (!this.getToken || !Number.isFinite(expiresAt)) return;
    const current = () => this._ready && this.welcome?.expires_at === expiresAt;
    const remaining = expiresAt * 1000 - Date.now();
    // Short-lived tokens (under 2 margins) are refreshed half-way, never in a tight loop.
    const delay = remaining > 2 * REFRESH_MARGIN_MS
      ? Math.min(remaining * REFRESH_SHARE, remaining - REFRESH_MARGIN_MS)
      : Math.max(0, remaining / 2);
    const due = Date.now() + delay;
    const attempt = () => {
      this._refreshTimer = null;
      if (!current()) return;
      this.refresh().catch((err) => {
        if (err.code === 'disconnected' || err.code === 'closed') return;
        if (REFRESH_UNSUPPORTED.has(err.code)) return; // a gateway without refresh: 4001, then reconnect
        this._emit('error', fail('refresh_failed', `token refresh failed: ${err.code || ''} ${err.message}`, { cause: err }));
        // Again while the session lives; at expiry the 4001 close reconnects with a fresh token.
        const left = expiresAt * 1000 - Date.now();
        if (current() && left > 500 && !this._refreshTimer) {
          this._refreshTimer = setTimeout(attempt, Math.min(REFRESH_RETRY_MS, left / 2));
        }
      });
    };
    const wait = () => {
      const ms = due - Date.now();
      if (ms > 0) this._refreshTimer = setTimeout(wait, Math.min(MAX_TIMER_MS, ms));
      else attempt();
    };
    wait();
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

// ---- HTTP transports -------------------------------------------------------------------
// SseLink and PollLink look like a WebSocket to the client above (readyState, send, close,
// onopen/onmessage/onclose/onerror): the client's commands go in as JSON text, the frames a
// WebSocket session would get come out, in order. What differs per transport stays here.

const CONNECTING = 0;
const CLOSED = 3;
const HTTP_RETRY_MS = 1_000; // a poll that failed (network, 429, 503) is tried again after this…
const HTTP_RETRIES = 2; // …this many times before the link closes (the client reconnects)
const POLL_WAIT_MS = 25_000; // how long a poll may wait on the server (its --poll-timeout caps it)
const POLL_GRACE_MS = 10_000; // a poll not answered this long after its wait is abandoned

/** `ws://host/prefix/ws?…` → `http://host/prefix<path>?<the same query>`. */
function endpoint(wsUrl, path) {
  const u = new URL(wsUrl.href);
  u.protocol = u.protocol === 'wss:' ? 'https:' : 'http:';
  u.pathname = u.pathname.replace(/\/ws$/, '').replace(/\/$/, '') + path;
  return u;
}

/** The claims of a JWT (unverified: only to read `sub` and `exp`), or {}. */
function claims(token) {
  try {
    const part = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    return JSON.parse(decodeURIComponent(escape(atob(part.padEnd(part.length + ((4 - (part.length % 4)) % 4), '=')))));
  } catch {
    return {};
  }
}

// Positions as text (docs/protocol.md "Positions as text"): `channel=seq@epoch` or `channel=-`.
const escapePos = (s) => s.replace(/[%,=@]/g, (c) => `%${c.charCodeAt(0).toString(16).toUpperCase().padStart(2, '0')}`);
const unescapePos = (s) => decodeURIComponent(s);
/** `channels=` of an HTTP transport: names joined by literal commas, each percent-encoded. */
function channelList(entries) {
  return entries.map(([ch]) => encodeURIComponent(ch)).join(',');
}
function encodeCursor(entries) {
  return entries.map(([ch, p]) => `${escapePos(ch)}=${p ? `${p.seq}@${escapePos(p.epoch)}` : '-'}`).join(',');
}
function parseCursor(text) {
  const out = new Map();
  for (const part of String(text || '').split(',').filter(Boolean)) {
    const i = part.lastIndexOf('=');
    if (i < 0) continue;
    const ch = unescapePos(part.slice(0, i));
    const v = part.slice(i + 1);
    const at = v.indexOf('@');
    out.set(ch, at < 0 ? null : { seq: Number(v.slice(0, at)), epoch: unescapePos(v.slice(at + 1)) });
  }
  return out;
}

/** What the link shares between SSE and long-polling: requests, replies, the socket face. */
class HttpLink {
  constructor(client, url, token) {
    this.client = client;
    this.url = url; // the /ws URL (with ?user= in anonymous mode)
    this.token = token;
    this.readyState = CONNECTING;
    this.onopen = this.onmessage = this.onclose = this.onerror = null;
    this._abort = new AbortController(); // ends every request of this link
  }

  _headers(extra = {}) {
    const h = { ...extra };
    if (this.token) h.Authorization = `Bearer ${this.token}`;
    return h;
  }

  _deliver(frame) {
    if (this.readyState !== OPEN) return;
    this.onmessage?.({ data: typeof frame === 'string' ? frame : JSON.stringify(frame) });
  }

  /** Ends the link from this side (no onclose: the client calls it itself). */
  close() {
    this.readyState = CLOSED;
    this._abort.abort();
  }

  /** Ends the link from the other side, with a WebSocket close code. */
  _end(code, reason = '') {
    if (this.readyState === CLOSED) return;
    const opened = this.readyState === OPEN;
    this.readyState = CLOSED;
    this._abort.abort();
    if (!opened) this.onerror?.({});
    this.onclose?.({ code, reason });
  }

  /**
   * POST /command (with `?stream=` for SSE stream commands): resolves with the reply frame;
   * an answer that is not JSON (the handshake's text answers: 401, 403, 429, 503) becomes an
   * error frame with the command's ref; a network failure is `disconnected`.
   */
  async _post(cmd, stream = null, token = this.token) {
    const u = endpoint(this.url, '/command');
    if (stream) u.searchParams.set('stream', stream);
    let res;
    try {
      res = await this.client.fetch(u.href, {
        method: 'POST',
        headers: { 'Content-Type': 'application/json', ...(token ? { Authorization: `Bearer ${token}` } : {}) },
        body: JSON.stringify(cmd),
        signal: this._abort.signal,
      });
    } catch (err) {
      return { type: 'error', ref: cmd.ref, code: 'disconnected', message: `request failed: ${err?.message || err}` };
    }
    const text = await res.text().catch(() => '');
    try {
      const frame = JSON.parse(text);
      if (frame && typeof frame === 'object') return frame;
    } catch { /* not JSON */ }
    const code = { 401: 'unauthorized', 403: 'forbidden', 429: 'rate_limited', 503: 'unavailable' }[res.status] || 'bad_request';
    const retry = Number(res.headers.get('retry-after'));
    return { type: 'error', ref: cmd.ref, code, message: text.trim() || `HTTP ${res.status}`, ...(retry ? { retry_after_ms: retry * 1000 } : {}) };
  }

  /** A command of the client, as `WebSocket.send` takes it; the link's `_command` carries it. */
  send(text) {
    const cmd = JSON.parse(text);
    // The client's watchdog probes liveness with `ping`s; each link watches its own.
    if (cmd.op === 'ping' && /^w\d+$/.test(String(cmd.ref))) {
      this._deliver({ type: 'pong', ref: cmd.ref });
      return;
    }
    this._command(cmd, cmd.channel);
  }

  /** A subscribe ack the stream or a poll gave without a ref, for a channel the client follows. */
  _unasked(ack) {
    if (ack.recovered === false) {
      // Resumed by the link (no subscribe of the client's waits for it): say what was lost.
      this._deliver({ type: 'gap', channel: ack.channel, reason: ack.reason || 'unknown', after: ack.position });
    }
  }
}

/**
 * Server-Sent Events: `GET /sse` read with fetch (so the token goes in `Authorization`, and
 * a proxy that buffers the stream shows as no welcome within `connectTimeoutMs`). The
 * channels the client follows and their positions go in the URL, so the stream resumes
 * them itself on any gateway. Later subscribes, unsubscribes and refreshes go to
 * `POST /command?stream=`; when that gateway does not know the stream (a load balancer
 * without affinity), the link opens a new stream with the new channel list instead.
 */
class SseLink extends HttpLink {
  constructor(client, url, token) {
    super(client, url, token);
    this.bound = new Map(); // channel -> position to resume from (null: none) for the next stream
    for (const ch of client._subs) this.bound.set(ch, copy(client._positions.get(ch)) || null);
    this.pending = new Map(); // channel -> ref of the client's subscribe its stream ack answers
    this.refreshRef = null; // a refresh answered by the next stream's welcome
    this.streamId = null;
    this._acked = new Set(); // channels whose stream ack came (for a subscribe or not)
    this._stream = null; // AbortController of the current stream
    this._lastByteAt = Date.now();
    this._open(false);
  }

  close() {
    clearInterval(this._silence);
    super.close();
  }

  _end(code, reason) {
    clearInterval(this._silence);
    super._end(code, reason);
  }

  async _open(rebind) {
    this._stream?.abort();
    const ctl = (this._stream = new AbortController());
    const onAbort = () => ctl.abort();
    this._abort.signal.addEventListener('abort', onAbort, { once: true });
    const u = endpoint(this.url, '/sse');
    // A channel being subscribed resumes where its subscribe says; the others where the
    // client is now.
    const positions = [...this.bound].map(([ch, p]) => [ch, this.pending.has(ch) ? p : copy(this.client._positions.get(ch)) || p]);
    if (positions.length) {
      const known = positions.filter(([, p]) => p);
      if (known.length) u.searchParams.set('last_event_id', encodeCursor(known));
      u.search += `${u.search ? '&' : '?'}channels=${channelList(positions)}`;
    }
    let res;
    try {
      res = await this.client.fetch(u.href, { headers: this._headers({ Accept: 'text/event-stream' }), signal: ctl.signal, cache: 'no-store' });
    } catch {
      if (ctl === this._stream) this._end(1006, 'stream failed');
      return;
    }
    if (ctl !== this._stream) return;
    if (!res.ok || !res.body || !/text\/event-stream/.test(res.headers.get('content-type') || '')) {
      const text = await res.text().catch(() => '');
      // A gateway that is full, draining or limiting this address (503, 429) is busy, not
      // a network that refuses the transport: 1013, try again later (elsewhere).
      const code = res.status === 401 && rebind ? 4001 : res.status === 503 || res.status === 429 ? 1013 : 1006;
      return this._end(code, `${res.status} ${text.trim()}`);
    }
    if (!rebind) {
      this.readyState = OPEN;
      this._lastByteAt = Date.now();
      this.onopen?.({});
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buf = '';
    let data = [];
    let first = true;
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done || ctl !== this._stream) break;
        this._lastByteAt = Date.now();
        buf += decoder.decode(value, { stream: true });
        let nl;
        while ((nl = buf.indexOf('\n')) >= 0) {
          const line = buf.slice(0, nl).replace(/\r$/, '');
          buf = buf.slice(nl + 1);
          if (line === '') {
            if (data.length) {
              const frame = data.join('\n');
              data = [];
              const ended = this._event(frame, first && rebind);
              first = false;
              if (ended || ctl !== this._stream) return;
            }
          } else if (line.startsWith('data:')) {
            data.push(line.slice(line[5] === ' ' ? 6 : 5));
          } // `id:`, `retry:`, comments (heartbeats): the positions are kept per message
        }
      }
    } catch { /* aborted or cut */ }
    if (ctl === this._stream) this._end(1006, 'stream ended');
  }

  /** One event of the stream; true when it ended the link. */
  _event(text, rebindWelcome) {
    let msg;
    try { msg = JSON.parse(text); } catch { return false; }
    switch (msg?.type) {
      case 'welcome':
        this.streamId = msg.conn_id;
        this._watchSilence(msg);
        if (!rebindWelcome) {
          this._deliver(msg);
        } else if (this.refreshRef) {
          this._deliver({ type: 'ack', ref: this.refreshRef, expires_at: msg.expires_at });
          this.refreshRef = null;
        }
        return false;
      case 'ack':
        if (typeof msg.channel !== 'string') return this._deliver(msg), false;
        if (msg.ref == null) {
          this._acked.add(msg.channel);
          const ref = this.pending.get(msg.channel);
          this.pending.delete(msg.channel);
          if (ref != null) this._deliver({ ...msg, ref });
          else this._unasked(msg);
        } else {
          this._deliver(msg); // the stream's copy of a POST subscribe's ack, in stream order
        }
        return false;
      case 'unsubscribed':
        return false;
      case 'close':
        this._end(Number(msg.code) || 1006, msg.message || msg.reason || '');
        return true;
      default:
        this._deliver(msg);
        return false;
    }
  }

  /** No byte (not even a heartbeat comment) for heartbeat + timeout: the stream is dead. */
  _watchSilence(welcome) {
    clearInterval(this._silence);
    const limit = (Number(welcome.heartbeat_ms) || 25_000) + (Number(welcome.heartbeat_timeout_ms) || 10_000);
    this._silence = setInterval(() => {
      if (Date.now() - this._lastByteAt > limit) this._end(4000, 'no traffic on the stream');
    }, Math.min(limit / 4, 5_000));
  }

  _command(cmd, ch) {
    switch (cmd.op) {
      case 'subscribe':
        if (this.bound.has(ch) && !this._acked.has(ch) && !this.pending.has(ch)) {
          this.pending.set(ch, cmd.ref); // the stream's own ack for the channel answers it
          return;
        }
        return this._streamCommand(cmd, () => {
          this.bound.set(ch, cmd.since || null);
          this.pending.set(ch, cmd.ref);
        });
      case 'unsubscribe':
        return this._streamCommand(cmd, () => {
          this.bound.delete(ch);
          this._deliver({ type: 'ack', ref: cmd.ref });
        }, () => this.bound.delete(ch));
      case 'refresh':
        return this._streamCommand(cmd, () => {
          this.token = cmd.token;
          this.refreshRef = cmd.ref;
        }, () => { this.token = cmd.token; });
      default:
        this._post(cmd).then((reply) => this._deliver(reply));
    }
  }

  /**
   * A command on the stream: `POST /command?stream=`; `rebind()` when the gateway does not
   * know the stream (then a new stream carries the change), `done()` after a success.
   */
  _streamCommand(cmd, rebind, done = () => {}) {
    this._post(cmd, this.streamId).then((reply) => {
      if (reply.type === 'error' && reply.code === 'unknown_stream') {
        rebind();
        return this._open(true);
      }
      if (reply.type !== 'error') done();
      // A subscribe's ack also comes on the stream, in order with what it recovers: that copy
      // is the one delivered. Everything else is answered here.
      if (cmd.op === 'subscribe' && reply.type === 'ack' && reply.position) {
        this.bound.set(cmd.channel, null);
        return;
      }
      this._deliver(reply);
    });
  }
}

/**
 * Long-polling: each poll names every channel followed and its position (`cursor`) and is
 * answered with what is newer, or after the next message, or empty after its wait; no state
 * on the server between polls, so each may reach another gateway. Subscribes change the
 * channel list of the next poll (the one waiting is abandoned: what it would have answered
 * comes again from history).
 */
class PollLink extends HttpLink {
  constructor(client, url, token) {
    super(client, url, token);
    this.cursor = new Map(); // channel -> position (null: none yet)
    for (const ch of client._subs) this.cursor.set(ch, copy(client._positions.get(ch)) || null);
    this.pending = new Map(); // channel -> ref of a subscribe not answered yet
    this.fresh = new Set(); // channels whose subscribe (with a position) the next poll answers
    this._poll = null; // AbortController of the poll in flight
    this._failures = 0;
    this._start();
  }

  async _start() {
    // A ping says the gateway answers and takes the token; then the session is "open".
    const reply = await this._post({ op: 'ping', ref: 'open' });
    if (this.readyState === CLOSED) return;
    if (reply.type !== 'pong') return this._end(reply.code === 'unauthorized' ? 4001 : 1006, `${reply.code}: ${reply.message}`);
    this.readyState = OPEN;
    this.onopen?.({});
    const c = this.token ? claims(this.token) : {};
    this._deliver({
      type: 'welcome', transport: 'poll', conn_id: null, user: c.sub || this.client.user || null,
      ...(Number.isFinite(c.exp) ? { expires_at: c.exp } : {}),
    });
    this._loop();
  }

  /** Starts the next poll now (the one in flight, if any, is abandoned). */
  _kick() {
    this._kicked = true;
    if (this._poll) this._poll.abort();
    else if (this._idle) this._idle();
  }

  async _loop() {
    while (this.readyState === OPEN) {
      if (!this.cursor.size) {
        await new Promise((r) => (this._idle = r));
        this._idle = null;
        continue;
      }
      const ctl = (this._poll = new AbortController());
      const onAbort = () => ctl.abort();
      this._abort.signal.addEventListener('abort', onAbort, { once: true });
      this._kicked = false;
      const asked = [...this.cursor];
      const answering = new Set([...this.pending.keys()].filter((ch) => this.cursor.has(ch)));
      const wait = [...answering].some((ch) => this.fresh.has(ch)) ? 0 : POLL_WAIT_MS;
      const form = new URLSearchParams();
      form.set('cursor', encodeCursor(asked));
      form.set('timeout_ms', String(wait));
      const timer = setTimeout(() => ctl.abort(), wait + POLL_GRACE_MS);
      let res = null;
      let body = null;
      try {
        res = await this.client.fetch(endpoint(this.url, '/poll').href, {
          method: 'POST',
          headers: this._headers({ 'Content-Type': 'application/x-www-form-urlencoded' }),
          body: `channels=${channelList(asked)}&${form}`,
          signal: ctl.signal,
        });
        body = await res.text();
      } catch {
        res = null;
      } finally {
        clearTimeout(timer);
        this._abort.signal.removeEventListener('abort', onAbort);
        this._poll = null;
      }
      if (this.readyState !== OPEN) return;
      // Kicked: the channel list changed. (Aborted by its own timer: a poll that hung, a
      // failure like any other.)
      if (ctl.signal.aborted && !res && this._kicked) continue;
      if (!res || res.status === 429 || res.status === 503) {
        if (++this._failures > HTTP_RETRIES) return this._end(res ? 1013 : 1006, res ? `poll answered ${res.status}` : 'poll failed');
        const retry = Number(res?.headers.get('retry-after')) * 1000;
        await new Promise((r) => setTimeout(r, jitter(retry || HTTP_RETRY_MS)));
        continue;
      }
      let answer;
      try { answer = JSON.parse(body); } catch { answer = null; }
      if (res.status === 401) return this._end(4001, answer?.message || 'unauthorized');
      if (!res.ok || answer?.type !== 'poll') {
        // The list was refused (a channel forbidden, too many, …): the subscribes that changed
        // it get the error; with none, the link cannot go on.
        if (!answering.size) return this._end(1011, `poll refused: ${body}`);
        for (const ch of answering) {
          this._deliver({ ...(answer || { type: 'error', code: 'bad_request', message: body }), ref: this.pending.get(ch) });
          this.pending.delete(ch);
          this.fresh.delete(ch);
          this.cursor.delete(ch);
        }
        continue;
      }
      this._failures = 0;
      this._answer(answer, answering);
      if (this._pause) {
        await new Promise((r) => setTimeout(r, jitter(this._pause)));
        this._pause = 0;
      }
    }
  }

  _answer(answer, answering) {
    const next = parseCursor(answer.cursor);
    const events = Array.isArray(answer.events) ? answer.events : [];
    const acked = new Set(events.filter((e) => e?.type === 'ack' && typeof e.channel === 'string').map((e) => e.channel));
    // A complete recovery has no ack in the answer: its messages (if any) follow.
    for (const ch of answering) {
      if (acked.has(ch) || !this.fresh.has(ch)) continue;
      this._deliver({ type: 'ack', ref: this.pending.get(ch), channel: ch, recovered: true });
      this.pending.delete(ch);
      this.fresh.delete(ch);
    }
    for (const ev of events) {
      if (!ev || typeof ev !== 'object') continue;
      if (ev.type === 'ack' && typeof ev.channel === 'string') {
        const ref = this.pending.get(ev.channel);
        this.pending.delete(ev.channel);
        this.fresh.delete(ev.channel);
        if (ref != null) this._deliver({ ...ev, ref });
        else this._unasked(ev);
      } else if (ev.type === 'close') {
        // A drain: the next poll goes on (through the load balancer, to another gateway).
        if (ev.retry_ms == null) return this._end(Number(ev.code) || 1000, ev.message || '');
        this._pause = Number(ev.retry_ms);
      } else {
        this._deliver(ev);
      }
    }
    for (const [ch, p] of next) if (this.cursor.has(ch) && p) this.cursor.set(ch, p);
  }

  _command(cmd, ch) {
    switch (cmd.op) {
      case 'subscribe':
        this.cursor.set(ch, isPosition(cmd.since) ? copy(cmd.since) : this.cursor.get(ch) || null);
        this.pending.set(ch, cmd.ref);
        if (this.cursor.get(ch)) this.fresh.add(ch);
        return this._kick();
      case 'unsubscribe':
        this.cursor.delete(ch);
        this.pending.delete(ch);
        this.fresh.delete(ch);
        this._deliver({ type: 'ack', ref: cmd.ref });
        return this._kick();
      case 'refresh':
        // Polls carry the token each time: check the new one with a ping, then use it.
        return this._post({ op: 'ping', ref: cmd.ref }, null, cmd.token).then((reply) => {
          if (reply.type !== 'pong') return this._deliver(reply);
          this.token = cmd.token;
          const exp = claims(cmd.token).exp;
          this._deliver({ type: 'ack', ref: cmd.ref, ...(Number.isFinite(exp) ? { expires_at: exp } : {}) });
        });
      default:
        this._post(cmd).then((reply) => this._deliver(reply));
    }
  }
}

export default Switchboard;
