// paddler dashboard: live fleet state from /api/v1/state/stream (server-sent
// events: the whole state first, then "delta" events with what changed).
// Plain JS, no dependencies. Every piece of data goes into the page through
// textContent or DOM properties, never through HTML parsing. The management
// token lives in one variable of this closure: never in the URL, a cookie or
// web storage, gone when the page is closed or reloaded.
(function () {
  "use strict";

  var here = document.currentScript ? document.currentScript.src : location.href;
  // app.js lives at <root>/dashboard/app.js; the API at <root>/api/v1/...
  var STREAM_URL = new URL("../api/v1/state/stream", here).href;
  var STATE_URL = new URL("../api/v1/state", here).href;
  var UPSTREAMS_URL = new URL("../api/v1/upstreams/", here).href;
  var RETRY_MIN = 1000, RETRY_MAX = 15000;
  var MAX_EVENTS = 200;
  // The stream sends an upstream's time stamps again once they moved 5 s:
  // younger ages are shown as "< 10 s".
  var FRESH_SECONDS = 10;

  var latest = null;          // the fleet-wide part of the last state or delta
  var receivedAt = 0;         // performance.now() when it came
  var upstreams = new Map();  // upstream id -> its fields, as the stream says
  var order = [];             // upstream ids, sorted by name then URL
  var samples = [];           // history samples, oldest first
  var windowSeconds = 900;
  var rows = new Map();       // upstream id -> row record
  var eventLog = [];          // event log entries, oldest first
  var filterText = "";
  var source = null, retryDelay = RETRY_MIN, retryTimer = null;
  var token = null;           // the management token (memory only)
  var pending = null;         // {id, action} waiting for a token
  var noticeTimer = null;

  function $(id) { return document.getElementById(id); }

  function setText(el, text) {
    text = String(text);
    if (el.textContent !== text) el.textContent = text;
  }

  function fmtInt(n) { return n === null || n === undefined ? "–" : String(Math.round(n)); }

  function fmtSeconds(s) {
    if (s === null || s === undefined) return "–";
    if (s < 1) return Math.round(s * 1000) + " ms";
    if (s < 100) return s.toFixed(2) + " s";
    return Math.round(s) + " s";
  }

  function fmtRate(r) {
    if (r === null || r === undefined) return "–";
    return r < 10 ? r.toFixed(2) : r.toFixed(1);
  }

  function fmtDuration(s) {
    if (s === null || s === undefined || isNaN(s)) return "";
    s = Math.max(0, s);
    if (s < 60) return Math.floor(s) + " s";
    if (s < 3600) return Math.floor(s / 60) + " min";
    if (s < 172800) return Math.floor(s / 3600) + " h " + Math.floor(s % 3600 / 60) + " min";
    return Math.floor(s / 86400) + " d";
  }

  function fmtAge(s) {
    if (s === null || s === undefined) return "never";
    if (s < FRESH_SECONDS) return "< " + FRESH_SECONDS + " s ago";
    return fmtDuration(s) + " ago";
  }

  function fmtCount(n) {
    if (n === null || n === undefined) return "–";
    if (n >= 1e6) return (n / 1e6).toFixed(1) + "M";
    if (n >= 1e4) return (n / 1e3).toFixed(1) + "k";
    return String(Math.round(n));
  }

  function sum(counts) {
    var total = 0;
    Object.keys(counts || {}).forEach(function (k) { total += counts[k]; });
    return total;
  }

  // The balancer's clock now: the last state's time plus what passed since.
  function serverNow() { return latest ? latest.time + (performance.now() - receivedAt) / 1000 : 0; }

  // -- connection ---------------------------------------------------------

  function setConnection(kind, text) {
    var el = $("connection");
    el.className = "connection " + kind;
    setText(el, text);
  }

  function connect() {
    retryTimer = null;
    if (source) source.close();
    source = new EventSource(STREAM_URL);
    source.addEventListener("open", function () {
      retryDelay = RETRY_MIN;
      setConnection("live", "live");
    });
    source.addEventListener("state", function (e) { applyState(JSON.parse(e.data)); });
    source.addEventListener("delta", function (e) { applyDelta(JSON.parse(e.data)); });
    source.addEventListener("sample", function (e) { addSample(JSON.parse(e.data)); });
    source.addEventListener("error", function () {
      setConnection("reconnecting", "reconnecting…");
      // The browser retries by itself unless the stream was refused (closed).
      if (source.readyState === EventSource.CLOSED) {
        source.close();
        source = null;
        if (retryTimer === null) {
          retryTimer = setTimeout(connect, retryDelay);
          retryDelay = Math.min(RETRY_MAX, retryDelay * 2);
        }
      }
    });
  }

  // -- state --------------------------------------------------------------

  function takeHeadline(part) {
    latest = latest || {};
    ["time", "policy", "buffer", "totals", "requests", "recent", "version", "management"].forEach(function (key) {
      if (part[key] !== undefined) latest[key] = part[key];
    });
    receivedAt = performance.now();
  }

  function applyState(state) {
    takeHeadline(state);
    if (state.history) {
      windowSeconds = state.history.window || 900;
      samples = state.history.samples.slice();
    }
    upstreams = new Map();
    state.upstreams.forEach(function (u) { upstreams.set(u.id, u); });
    eventLog = [];
    addEvents(state.events || [], true);
    setText($("version"), "paddler " + state.version);
    renderHeadline();
    renderFleet(null);
    drawCharts();
  }

  // Merge one upstream's changed fields; nested objects (recent, routing) by key.
  function merge(u, changes) {
    Object.keys(changes).forEach(function (field) {
      var value = changes[field];
      if (value && typeof value === "object" && !Array.isArray(value) && u[field] && typeof u[field] === "object") {
        Object.keys(value).forEach(function (k) { u[field][k] = value[k]; });
      } else {
        u[field] = value;
      }
    });
  }

  function applyDelta(delta) {
    takeHeadline(delta);
    var changed = null;
    if (delta.upstreams) {
      changed = new Set();
      Object.keys(delta.upstreams).forEach(function (id) {
        var u = upstreams.get(id);
        if (u) merge(u, delta.upstreams[id]); else upstreams.set(id, delta.upstreams[id]);
        changed.add(id);
      });
      (delta.removed || []).forEach(function (id) { upstreams.delete(id); changed.add(id); });
    }
    if (delta.events && delta.events.length) addEvents(delta.events, false);
    renderHeadline();
    if (changed && changed.size) renderFleet(changed);
    drawCharts();
  }

  function addSample(sample) {
    samples.push(sample);
    var horizon = sample.time - windowSeconds;
    while (samples.length && samples[0].time < horizon) samples.shift();
    drawCharts();
  }

  function renderHeadline() {
    var t = latest.totals, r = latest.recent, requests = latest.requests;
    setText($("policy"), latest.policy ? "policy " + latest.policy : "");
    setText($("t-upstreams"), t.upstreams.healthy + " / " + t.upstreams.total);
    setText($("t-slots-idle"), fmtInt(t.slots_idle));
    setText($("t-slots-processing"), fmtInt(t.slots_processing));
    setText($("t-slots-total"), fmtInt(t.slots_total));
    setText($("t-buffered"), fmtInt(t.requests_buffered));
    var capacity = latest.buffer ? latest.buffer.capacity : null;
    setText($("t-buffer-limit"), capacity === null ? "" : capacity === 0 ? " / off" : " / " + capacity);
    setText($("t-buffered-wait"), t.requests_buffered ? "oldest waits " + fmtSeconds(t.oldest_buffered_wait)
      : capacity ? "wait up to " + fmtSeconds(latest.buffer.timeout) : "");
    setText($("t-in-flight"), fmtInt(t.requests_in_flight));
    setText($("t-rps"), fmtRate(r.requests_per_second));
    var parts = [];
    Object.keys(requests.by_status).forEach(function (k) { parts.push(k + " " + requests.by_status[k]); });
    setText($("t-requests"), requests.total + " total" + (parts.length ? " · " + parts.join(" · ") : ""));
    var outcomes = requests.outcomes || {};
    setText($("t-not-served"), [outcomes.refused, outcomes.timed_out, outcomes.cancelled].map(function (c) {
      return fmtCount(sum(c));
    }).join(" / "));
    var why = [];
    ["refused", "timed_out", "cancelled"].forEach(function (kind) {
      Object.keys(outcomes[kind] || {}).forEach(function (reason) {
        if (outcomes[kind][reason]) why.push(reason.replace(/_/g, " ") + " " + outcomes[kind][reason]);
      });
    });
    setText($("t-not-served-why"), why.join(" · "));
    setText($("t-ttft"), [r.ttft_p50, r.ttft_p95, r.ttft_p99].map(fmtSeconds).join(" / "));
    setText($("t-duration"), [r.duration_p50, r.duration_p95, r.duration_p99].map(fmtSeconds).join(" / "));
  }

  // -- fleet table --------------------------------------------------------

  function cell(tr, className, label) {
    var td = document.createElement("td");
    if (className) td.className = className;
    if (label) td.dataset.label = label;
    tr.appendChild(td);
    return td;
  }

  function span(parent, className) {
    var el = document.createElement("span");
    el.className = className;
    parent.appendChild(el);
    return el;
  }

  function makeRow(id) {
    var tr = document.createElement("tr");
    tr.dataset.upstream = id;
    var row = { tr: tr, text: "", id: id, key: null };
    var actions = cell(tr, "actions", "");
    row.button = document.createElement("button");
    row.button.type = "button";
    row.button.className = "drain";
    row.button.addEventListener("click", function () {
      var u = upstreams.get(id);
      if (u) act(id, u.draining ? "undrain" : "drain");
    });
    actions.appendChild(row.button);
    var nameCell = cell(tr, "name-cell", "");
    row.name = span(nameCell, "name");
    row.url = span(nameCell, "url");
    var stateCell = cell(tr, "state-cell", "State");
    var line = span(stateCell, "line");
    row.state = span(line, "state");
    row.since = span(line, "since");
    row.age = span(stateCell, "age");
    row.error = cell(tr, "error", "Error");
    var slotsCell = cell(tr, "slots-cell", "Slots");
    var wrap = document.createElement("div");
    wrap.className = "slots";
    row.bar = document.createElement("div");
    row.bar.className = "bar";
    row.proc = document.createElement("div");
    row.proc.className = "proc";
    row.bar.appendChild(row.proc);
    row.slots = document.createElement("span");
    row.slots.className = "nums";
    wrap.appendChild(row.bar);
    wrap.appendChild(row.slots);
    slotsCell.appendChild(wrap);
    row.flight = cell(tr, "num flight half", "In flight");
    row.rps = cell(tr, "num rps half", "Req/s");
    row.ttft = cell(tr, "num ttft", "TTFT p50/p95");
    row.duration = cell(tr, "num duration", "Duration p50/p95");
    row.errors = cell(tr, "num errors half", "4xx / 5xx");
    var done = cell(tr, "num done half", "Served / failed");
    row.served = span(done, "served");
    done.appendChild(document.createTextNode(" / "));
    row.failed = span(done, "failed");
    row.model = cell(tr, "model", "Model");
    row.routing = cell(tr, "routing", "Cache · speed");
    row.cache = span(row.routing, "cache");
    row.speed = span(row.routing, "speed");
    return row;
  }

  function pair(a, b, format) { return format(a) + " / " + format(b); }

  // Two durations with one unit when they share it: "120 / 340 ms", "1.53 / 3.03 s".
  function secondsPair(a, b) {
    if (a === null || a === undefined || b === null || b === undefined) return pair(a, b, fmtSeconds);
    var x = fmtSeconds(a).split(" "), y = fmtSeconds(b).split(" ");
    return x[1] === y[1] ? x[0] + " / " + y[0] + " " + y[1] : x.join(" ") + " / " + y.join(" ");
  }

  // The cost policy's figures: [prefix cache, speeds], or empty texts.
  function routingText(routing) {
    if (!routing || routing.prefix_hits === undefined || routing.prefix_hits === null) return ["", ""];
    var cache = "hits " + fmtCount(routing.prefix_hits) + " · saved " + fmtCount(routing.tokens_saved) + " tok";
    var speed = "";
    if (routing.prompt_tokens_per_second !== null && routing.prompt_tokens_per_second !== undefined) {
      speed = fmtCount(routing.prompt_tokens_per_second) + " / " + fmtCount(routing.generation_tokens_per_second) +
              " tok/s" + (routing.speeds_measured ? "" : " (prior)");
    }
    return [cache, speed];
  }

  function updateRow(row, u) {
    setText(row.name, u.name);
    setText(row.url, u.url);
    var status = u.status || u.state;
    var cls = "state state-" + (/^[a-z]+$/.test(status) ? status : "unknown");
    if (row.state.className !== cls) row.state.className = cls;
    setText(row.state, status);
    setText(row.slots, u.slots_idle + " / " + u.slots_processing + " / " + u.slots_total);
    var share = u.slots_total ? (100 * u.slots_processing / u.slots_total) : 0;
    row.proc.style.width = share.toFixed(1) + "%";
    row.bar.className = u.slots_total ? "bar" : "bar none";
    row.bar.title = u.slots_processing + " of " + u.slots_total + " slots busy";
    var recent = u.recent || {};
    setText(row.flight, fmtInt(u.requests_in_flight));
    setText(row.rps, fmtRate(recent.requests_per_second));
    setText(row.ttft, secondsPair(recent.ttft_p50, recent.ttft_p95));
    setText(row.duration, secondsPair(recent.duration_p50, recent.duration_p95));
    setText(row.errors, pair(recent.responses_4xx, recent.responses_5xx, fmtInt));
    row.errors.classList.toggle("bad", !!(recent.responses_5xx));
    setText(row.served, u.requests_served);
    setText(row.failed, u.requests_failed);
    var model = u.model === null || u.model === undefined ? "–" : u.model;
    if (u.model_state) model += " (" + u.model_state + ")";
    if (u.role === "router") model = "router";
    setText(row.model, model);
    row.model.title = (u.models || []).join(", ");
    var routing = routingText(u.routing);
    setText(row.cache, routing[0]);
    setText(row.speed, routing[1]);
    row.speed.title = "prompt / generation speed";
    setText(row.error, u.last_error || "");
    row.error.title = u.last_error || "";
    row.state.title = u.last_error || "";
    setText(row.button, u.draining ? "Undrain" : "Drain");
    row.button.title = (u.draining ? "Send requests to " : "Send no new request to ") + u.name;
    row.text = [u.name, u.url, status, u.model || "", u.last_error || ""].join(" ").toLowerCase();
    row.tr.hidden = filterText !== "" && row.text.indexOf(filterText) < 0;
    row.u = u;
    updateClock(row);
  }

  // The parts of a row that move with time alone: ages and time in state.
  function updateClock(row) {
    var u = row.u, now = serverNow();
    setText(row.age, "updated " + fmtAge(u.last_update_at === null || u.last_update_at === undefined ? null : now - u.last_update_at));
    var since = u.draining && u.draining_since !== null && u.draining_since !== undefined ? u.draining_since : u.state_since;
    setText(row.since, since === undefined || since === null ? "" : fmtDuration(now - since));
  }

  // Router-mode models (children of a router) come after the other upstreams, grouped by model.
  function sortKey(u) {
    return u.parent_id ? ["\uffff" + (u.model || ""), u.name] : [u.name, u.url];
  }

  function sortOrder() {
    order = Array.from(upstreams.keys());
    order.sort(function (a, b) {
      var ka = sortKey(upstreams.get(a)), kb = sortKey(upstreams.get(b));
      if (ka[0] !== kb[0]) return ka[0] < kb[0] ? -1 : 1;
      return ka[1] < kb[1] ? -1 : ka[1] > kb[1] ? 1 : 0;
    });
  }

  // Render the rows of the ids in `changed` (every row when null), then fix
  // the order when upstreams came, went or were renamed.
  function renderFleet(changed) {
    var body = $("fleet-rows");
    var reorder = changed === null;
    var ids = changed === null ? Array.from(upstreams.keys()) : Array.from(changed);
    ids.forEach(function (id) {
      var u = upstreams.get(id);
      var row = rows.get(id);
      if (!u) {
        if (row) { row.tr.remove(); rows.delete(id); }
        return;
      }
      if (!row) {
        row = makeRow(id);
        rows.set(id, row);
      }
      if (row.key !== u.name + "\n" + u.url) {  // new or renamed: its place may change
        row.key = u.name + "\n" + u.url;
        reorder = true;
      }
      updateRow(row, u);
    });
    rows.forEach(function (row, id) {
      if (!upstreams.has(id)) { row.tr.remove(); rows.delete(id); }
    });
    if (reorder || changed === null) {
      sortOrder();
      order.forEach(function (id, index) {
        var tr = rows.get(id).tr;
        if (body.children[index] !== tr) body.insertBefore(tr, body.children[index] || null);
      });
    }
    var anyRouting = latest.policy === "cost";
    $("fleet").classList.toggle("no-routing", !anyRouting);
    var shown = 0;
    rows.forEach(function (row) { if (!row.tr.hidden) shown += 1; });
    setText($("fleet-count"), filterText ? shown + " of " + upstreams.size : String(upstreams.size));
    $("fleet-empty").hidden = upstreams.size > 0;
  }

  function applyFilter() {
    filterText = $("filter").value.trim().toLowerCase();
    rows.forEach(function (row) { row.tr.hidden = filterText !== "" && row.text.indexOf(filterText) < 0; });
    if (latest) renderFleet(new Set());
  }

  // -- event log ----------------------------------------------------------

  function eventText(e) {
    if (e.kind === "state") return e.previous + " → " + e.state + (e.reason ? ": " + e.reason : "");
    if (e.kind === "added") return "added" + (e.state ? " (" + e.state + ")" : "");
    if (e.kind === "undrained") return "undrained: takes requests again";
    if (e.kind === "draining") return "draining: no new requests";
    if (e.kind === "model_load") return e.text + (e.reason ? ": " + e.reason : "");
    return e.kind;
  }

  function eventClass(e) {
    if (e.kind === "state") return "ev ev-" + (/^[a-z]+$/.test(e.state) ? e.state : "unknown");
    return "ev ev-" + (/^[a-z]+$/.test(e.kind) ? e.kind : "other");
  }

  function makeEvent(e) {
    var li = document.createElement("li");
    li.className = eventClass(e);
    li.dataset.seq = e.seq;
    var when = document.createElement("time");
    when.textContent = new Date(e.time * 1000).toLocaleTimeString([], { hour12: false });
    when.dateTime = new Date(e.time * 1000).toISOString();
    li.appendChild(when);
    span(li, "who").textContent = e.upstream;
    span(li, "what").textContent = eventText(e);
    return li;
  }

  function addEvents(entries, replace) {
    var list = $("events");
    if (replace) {
      while (list.firstChild) list.removeChild(list.firstChild);
    }
    var last = eventLog.length ? eventLog[eventLog.length - 1].seq : 0;
    entries.forEach(function (e) {
      if (e.seq <= last) return;  // already shown (a new page's first state overlaps)
      last = e.seq;
      eventLog.push(e);
      list.insertBefore(makeEvent(e), list.firstChild);
    });
    while (eventLog.length > MAX_EVENTS) {
      eventLog.shift();
      list.removeChild(list.lastChild);
    }
    setText($("events-count"), eventLog.length ? String(eventLog.length) : "");
    $("events-empty").hidden = eventLog.length > 0;
  }

  // -- drain / undrain ----------------------------------------------------

  function notice(text, kind) {
    var el = $("notice");
    el.className = "notice " + (kind || "info");
    setText(el, text);
    el.hidden = false;
    if (noticeTimer !== null) clearTimeout(noticeTimer);
    noticeTimer = setTimeout(function () { el.hidden = true; noticeTimer = null; }, 8000);
  }

  function askToken(message, action) {
    pending = action;
    setText($("token-message"), message);
    $("token-panel").hidden = false;
    $("token-input").value = "";
    $("token-input").focus();
  }

  function closeToken() {
    $("token-panel").hidden = true;
    $("token-input").value = "";
  }

  function nameOf(id) {
    var u = upstreams.get(id);
    return u ? u.name : id;
  }

  function act(id, action) {
    if (token === null && latest && latest.management && latest.management.token_required) {
      askToken("To " + action + " " + nameOf(id) + ", give the management token.", { id: id, action: action });
      return;
    }
    send(id, action);
  }

  function send(id, action) {
    var row = rows.get(id);
    if (row) row.button.disabled = true;
    var headers = { "Accept": "application/json" };
    if (token !== null) headers["Authorization"] = "Bearer " + token;
    fetch(UPSTREAMS_URL + encodeURIComponent(id) + "/" + action, {
      method: "POST", headers: headers, credentials: "omit", cache: "no-store", referrerPolicy: "no-referrer"
    }).then(function (response) {
      return response.json().catch(function () { return null; }).then(function (body) {
        return { status: response.status, ok: response.ok, body: body };
      });
    }).then(function (answer) {
      var message = answer.body && answer.body.error ? answer.body.error.message : "HTTP " + answer.status;
      if (answer.status === 401 || answer.status === 403) {
        token = null;
        askToken((answer.status === 401 ? "The balancer needs the management token" : "The token was refused") +
                 " to " + action + " " + nameOf(id) + ".", { id: id, action: action });
      } else if (!answer.ok) {
        notice("Could not " + action + " " + nameOf(id) + ": " + message, "error");
      } else {
        var u = upstreams.get(id);
        if (u && answer.body) {
          ["draining", "status", "state", "removal_pending"].forEach(function (k) {
            if (answer.body[k] !== undefined) u[k] = answer.body[k];
          });
          renderFleet(new Set([id]));
        }
        notice(nameOf(id) + (action === "drain" ? " is draining: no new requests go there." : " takes requests again."), "ok");
      }
    }).catch(function (error) {
      notice("Could not " + action + " " + nameOf(id) + ": " + error, "error");
    }).then(function () {
      if (row) row.button.disabled = false;
    });
  }

  function tokenSubmitted(event) {
    event.preventDefault();
    var value = $("token-input").value.trim();
    if (!value) return;
    token = value;
    closeToken();
    var action = pending;
    pending = null;
    if (action) send(action.id, action.action);
    else notice("The management token is kept in this page until it is closed or reloaded.", "ok");
  }

  // -- charts -------------------------------------------------------------

  function css(name) { return getComputedStyle(document.documentElement).getPropertyValue(name).trim(); }

  // The samples plus a provisional point for "now" from the latest state, so
  // the charts move between two history samples.
  function points() {
    if (!latest) return samples;
    var live = {
      time: latest.time,
      slots_processing: latest.totals.slots_processing,
      slots_total: latest.totals.slots_total,
      requests_buffered: latest.totals.requests_buffered,
      requests_per_second: null,
      ttft_p95: latest.recent.ttft_p95
    };
    var last = samples.length ? samples[samples.length - 1] : null;
    return last && last.time >= live.time ? samples : samples.concat([live]);
  }

  function drawChart(canvas, series, format, data) {
    var dpr = window.devicePixelRatio || 1;
    var w = canvas.clientWidth, h = canvas.clientHeight;
    if (!w || !h) return;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    var ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    var end = data.length ? data[data.length - 1].time : 0;
    // Show the whole window once there is that much history; until then the
    // span of the data (at least a minute), so a fresh page is not a sliver.
    var span = data.length ? Math.min(windowSeconds, Math.max(60, end - data[0].time)) : windowSeconds;
    var start = end - span;
    var max = 0;
    series.forEach(function (s) {
      data.forEach(function (p) { var v = s.value(p); if (v !== null && v > max) max = v; });
    });
    if (max <= 0) max = 1;
    max *= 1.1;
    var top = 12, bottom = h - 2, left = 0, right = w;
    ctx.strokeStyle = css("--line");
    ctx.lineWidth = 1;
    ctx.beginPath();
    ctx.moveTo(left, bottom + 0.5);
    ctx.lineTo(right, bottom + 0.5);
    ctx.stroke();
    ctx.fillStyle = css("--muted");
    ctx.font = "10px " + css("--font");
    ctx.textBaseline = "top";
    ctx.fillText(format(max / 1.1), 2, 0);
    ctx.textAlign = "right";
    ctx.fillText("last " + Math.round(span / 60) + " min", right - 2, 0);
    ctx.textAlign = "left";
    function x(t) { return left + (t - start) / span * (right - left); }
    function y(v) { return bottom - v / max * (bottom - top); }
    series.forEach(function (s) {
      ctx.strokeStyle = s.color;
      ctx.lineWidth = s.width || 1.5;
      ctx.beginPath();
      var pen = false, firstX = null, lastX = null;
      data.forEach(function (p) {
        var v = s.value(p);
        if (v === null || v === undefined) { pen = false; return; }
        var px = x(p.time), py = y(v);
        if (pen) ctx.lineTo(px, py); else ctx.moveTo(px, py);
        if (firstX === null) firstX = px;
        lastX = px;
        pen = true;
      });
      ctx.stroke();
      if (s.fill && firstX !== null) {
        ctx.lineTo(lastX, bottom);
        ctx.lineTo(firstX, bottom);
        ctx.closePath();
        ctx.globalAlpha = 0.15;
        ctx.fillStyle = s.color;
        ctx.fill();
        ctx.globalAlpha = 1;
      }
    });
  }

  function lastValue(data, key) {
    for (var i = data.length - 1; i >= 0; i--) {
      if (data[i][key] !== null && data[i][key] !== undefined) return data[i][key];
    }
    return null;
  }

  function drawCharts() {
    var data = points();
    var ok = css("--healthy"), busy = css("--busy"), blue = css("--loading"), grey = css("--draining");
    drawChart($("c-slots"), [
      { value: function (p) { return p.slots_total; }, color: grey, width: 1 },
      { value: function (p) { return p.slots_processing; }, color: busy, fill: true }
    ], fmtInt, data);
    drawChart($("c-buffered"), [{ value: function (p) { return p.requests_buffered; }, color: css("--unreachable"), fill: true }], fmtInt, data);
    drawChart($("c-rps"), [{ value: function (p) { return p.requests_per_second; }, color: ok, fill: true }], fmtRate, data);
    drawChart($("c-ttft"), [{ value: function (p) { return p.ttft_p95; }, color: blue, fill: true }], fmtSeconds, data);
    var busyNow = lastValue(data, "slots_processing"), totalNow = lastValue(data, "slots_total");
    setText($("c-slots-now"), busyNow === null ? "" : fmtInt(busyNow) + " / " + fmtInt(totalNow));
    setText($("c-buffered-now"), fmtInt(lastValue(data, "requests_buffered")));
    setText($("c-rps-now"), fmtRate(lastValue(data, "requests_per_second")));
    setText($("c-ttft-now"), fmtSeconds(lastValue(data, "ttft_p95")));
  }

  // -- start --------------------------------------------------------------

  function tick() { rows.forEach(updateClock); }

  document.addEventListener("DOMContentLoaded", function () {
    $("filter").addEventListener("input", applyFilter);
    $("token-form").addEventListener("submit", tokenSubmitted);
    $("token-button").addEventListener("click", function () {
      askToken(token === null ? "Give the management token to drain and undrain from this page."
                              : "A token is in use; give another one or forget it.", null);
    });
    $("token-cancel").addEventListener("click", function () { pending = null; closeToken(); });
    $("token-forget").addEventListener("click", function () {
      token = null;
      pending = null;
      closeToken();
      notice("The management token is forgotten.", "ok");
    });
    window.addEventListener("resize", drawCharts);
    setInterval(tick, 1000);
    connect();
  });
  // For people poking from the console: the JSON snapshot URL.
  window.paddlerStateURL = STATE_URL;
})();
