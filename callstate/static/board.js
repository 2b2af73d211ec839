// The live call board: loads /board/state, then applies /board/events (Server-Sent Events).
// Every value from the server is put in the page as text (textContent), never as markup.
"use strict";

(() => {
  const STATUSES = ["created", "started", "ringing", "answered", "agentEnded"];
  const SHOWN = 20;
  const RECORDS_SHOWN = 10;
  const REJECTIONS_SHOWN = 8;
  const LATE_SECONDS = 5;
  const RETRY_MS = 5000;

  const board = {
    calls: new Map(), // call_id -> summary, ended ones kept so an older version never returns
    records: [],
    rejections: [],
    backlog: [],
    forwarding: null, // record forwarding's figures as of the last load; null while it is off
    offsetMs: 0, // server clock minus this browser's
    pending: null, // change messages received while the picture loads
    loadSeq: 0,
    source: null,
  };

  function now() {
    return Date.now() + board.offsetMs;
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function duration(ms) {
    const total = Math.max(0, Math.floor(ms / 1000));
    const h = Math.floor(total / 3600);
    const m = Math.floor((total % 3600) / 60);
    const s = String(total % 60).padStart(2, "0");
    return h > 0 ? `${h}:${String(m).padStart(2, "0")}:${s}` : `${m}:${s}`;
  }

  function clockTime(ms) {
    if (typeof ms !== "number") return "";
    return new Date(ms).toLocaleTimeString([], { hour12: false });
  }

  function setConnection(state, text) {
    const node = document.getElementById("connection");
    node.dataset.state = state;
    node.textContent = text;
  }

  // --- the model -----------------------------------------------------------------------------

  function putCall(call) {
    const known = board.calls.get(call.call_id);
    if (known && known.version >= call.version) return;
    board.calls.set(call.call_id, call);
  }

  function putRecord(record) {
    const index = board.records.findIndex((r) => r.call_id === record.call_id);
    if (index >= 0) {
      if (board.records[index].revision >= record.revision) return;
      board.records.splice(index, 1);
    }
    board.records.unshift(record);
    board.records.length = Math.min(board.records.length, SHOWN);
  }

  function rejectionKey(item) {
    return item.log_id || `${item.ms}:${item.reason}:${item.field}`;
  }

  function putRejection(item) {
    const key = rejectionKey(item);
    if (board.rejections.some((known) => rejectionKey(known) === key)) return;
    board.rejections.push(item);
    board.rejections.sort((a, b) => (b.ms || 0) - (a.ms || 0));
    board.rejections.length = Math.min(board.rejections.length, SHOWN);
  }

  function applyChange(message) {
    message.calls.forEach(putCall);
    message.records.forEach(putRecord);
    message.rejections.forEach(putRejection);
  }

  function applyState(state, pending) {
    board.offsetMs = state.server_ms - Date.now();
    board.calls = new Map(state.active.map((call) => [call.call_id, call]));
    board.records = state.records.slice(0, SHOWN);
    board.rejections = state.rejections.slice(0, SHOWN);
    board.backlog = state.backlog;
    board.forwarding = state.forwarding || null;
    // Changes committed after the picture was taken are newer: versions sort it out.
    pending.forEach(applyChange);
  }

  // --- the page ------------------------------------------------------------------------------

  function callItem(call) {
    const item = el("li", "call");
    item.dataset.callId = call.call_id;
    item.append(el("span", "agent", call.agent || "no agent"));
    const timer = el("span", "timer");
    if (typeof call.since_ms === "number") timer.dataset.since = String(call.since_ms);
    item.append(timer);
    item.append(el("span", "number", call.caller || "?"));
    item.append(el("span", "number", `→ ${call.callee || "?"}`));
    item.append(el("span", "call-id", call.call_id));
    return item;
  }

  function renderActive() {
    const active = [...board.calls.values()].filter((call) => call.active);
    const statuses = [...STATUSES];
    active.forEach((call) => {
      if (!statuses.includes(call.status)) statuses.push(call.status);
    });
    const groups = statuses.map((status) => {
      const calls = active
        .filter((call) => call.status === status)
        .sort((a, b) => (a.since_ms || 0) - (b.since_ms || 0));
      const group = el("section", "group");
      group.id = `status-${status}`;
      group.dataset.status = status;
      const title = el("h3", null, status);
      title.append(el("span", "count", calls.length));
      group.append(title);
      const list = el("ol", "calls");
      calls.forEach((call) => list.append(callItem(call)));
      if (!calls.length) list.append(el("li", "empty", "—"));
      group.append(list);
      return group;
    });
    document.getElementById("groups").replaceChildren(...groups);
    document.getElementById("active-count").textContent = String(active.length);
  }

  function recordItem(record) {
    const item = el("li");
    item.dataset.callId = record.call_id;
    item.append(el("span", "time", clockTime(record.ended_ms)));
    item.append(el("span", "what", `${record.caller || "?"} → ${record.callee || "?"}`));
    const badge = el("span", "badge disposition", record.disposition || "unknown");
    badge.dataset.value = record.disposition || "unknown";
    item.append(badge);
    const talk = typeof record.answer_duration === "number" ? record.answer_duration : null;
    const parts = [
      record.agent ? `agent ${record.agent}` : null,
      typeof record.duration === "number" ? `${duration(record.duration * 1000)} total` : null,
      talk !== null ? `${duration(talk * 1000)} talk` : null,
      record.sip_code ? `SIP ${record.sip_code}` : null,
      record.closed_by === "sweeper" ? "closed by sweeper" : null,
      record.revision > 1 ? `revision ${record.revision}` : null,
    ];
    item.append(el("span", "detail", parts.filter(Boolean).join(" · ")));
    return item;
  }

  function rejectionItem(rejection) {
    const item = el("li");
    if (rejection.call_id) item.dataset.callId = rejection.call_id;
    item.append(el("span", "time", clockTime(rejection.ms)));
    const what = rejection.source === "delivery" ? "delivery refused" : rejection.call_status;
    item.append(el("span", "what", what || "event"));
    const reason = rejection.field ? `${rejection.reason} (${rejection.field})` : rejection.reason;
    item.append(el("span", "badge reason", reason || "rejected"));
    item.append(el("span", "detail", rejection.call_id || ""));
    return item;
  }

  function renderList(id, items, build, emptyText) {
    const nodes = items.map(build);
    if (!nodes.length) nodes.push(el("li", "empty", emptyText));
    document.getElementById(id).replaceChildren(...nodes);
  }

  function backlogItem(shard) {
    const age = typeof shard.oldest_seconds === "number" ? shard.oldest_seconds : null;
    const text = `shard ${shard.shard}: ${shard.entries}` + (age ? ` · ${age.toFixed(1)} s` : "");
    const item = el("li", null, text);
    item.dataset.late = String(age !== null && age > LATE_SECONDS);
    return item;
  }

  function renderForwarding() {
    const node = document.getElementById("forwarding");
    const figures = board.forwarding;
    node.hidden = figures === null;
    if (figures === null) return;
    node.textContent =
      `records forwarded ${figures.delivered} · failed attempts ${figures.failed}` +
      ` · retrying ${figures.retrying} · dead letters ${figures.dead_letters}`;
    node.dataset.late = String(figures.dead_letters > 0);
  }

  function render() {
    renderActive();
    renderForwarding();
    renderList("record-list", board.records.slice(0, RECORDS_SHOWN), recordItem, "none yet");
    renderList("rejection-list", board.rejections.slice(0, REJECTIONS_SHOWN), rejectionItem, "none");
    renderList("backlog-list", board.backlog, backlogItem, "—");
    tick();
  }

  let renderQueued = false;
  function scheduleRender() {
    if (renderQueued) return;
    renderQueued = true;
    requestAnimationFrame(() => {
      renderQueued = false;
      render();
    });
  }

  function tick() {
    const at = now();
    document.querySelectorAll(".timer[data-since]").forEach((node) => {
      node.textContent = duration(at - Number(node.dataset.since));
    });
    document.getElementById("clock").textContent = clockTime(at);
  }

  // --- the server ----------------------------------------------------------------------------

  async function loadState() {
    const seq = ++board.loadSeq;
    const pending = [];
    board.pending = pending;
    try {
      const response = await fetch("board/state", { credentials: "same-origin" });
      if (response.status === 401) {
        setConnection("down", "unauthorized: open /?token=… once");
        return;
      }
      if (!response.ok) throw new Error(`state: HTTP ${response.status}`);
      const state = await response.json();
      if (seq !== board.loadSeq) return; // a later reload is under way
      board.pending = null;
      applyState(state, pending);
      setConnection("live", "live");
      scheduleRender();
    } catch (error) {
      if (seq !== board.loadSeq) return;
      setConnection("down", "cannot load the board; retrying");
      setTimeout(loadState, RETRY_MS);
    }
  }

  function onChange(event) {
    const message = JSON.parse(event.data);
    if (board.pending) board.pending.push(message);
    applyChange(message);
    scheduleRender();
  }

  function onBacklog(event) {
    board.backlog = JSON.parse(event.data).backlog;
    scheduleRender();
  }

  function connect() {
    const source = new EventSource("board/events");
    board.source = source;
    // `reset`: the server listens from now on; what it published before is in the state.
    source.addEventListener("reset", loadState);
    source.addEventListener("change", onChange);
    source.addEventListener("backlog", onBacklog);
    source.addEventListener("down", () => setConnection("connecting", "store unavailable; waiting"));
    source.addEventListener("error", () => {
      if (source.readyState === EventSource.CLOSED) {
        // Refused (401, 503 when the server has no stream to spare): EventSource gives up,
        // so try again later; an ended stream reconnects by itself.
        setConnection("down", "live updates unavailable; retrying");
        setTimeout(connect, RETRY_MS + Math.random() * RETRY_MS);
      } else {
        setConnection("connecting", "reconnecting…");
      }
    });
  }

  document.addEventListener("DOMContentLoaded", () => {
    render();
    setInterval(tick, 1000);
    connect();
  });
})();
