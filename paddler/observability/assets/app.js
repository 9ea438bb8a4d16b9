// paddler dashboard: live fleet state from /api/v1/state/stream (server-sent
// events). Plain JS, no dependencies. Every piece of data goes into the page
// through textContent or DOM properties, never through HTML parsing.
(function () {
  "use strict";

  var here = document.currentScript ? document.currentScript.src : location.href;
  // app.js lives at <root>/dashboard/app.js; the API at <root>/api/v1/...
  var STREAM_URL = new URL("../api/v1/state/stream", here).href;
  var STATE_URL = new URL("../api/v1/state", here).href;
  var RETRY_MIN = 1000, RETRY_MAX = 15000;

  var latest = null;          // the last state received
  var receivedAt = 0;         // performance.now() when it came
  var samples = [];           // history samples, oldest first
  var windowSeconds = 900;
  var rows = new Map();       // upstream id -> row record
  var filterText = "";
  var source = null, retryDelay = RETRY_MIN, retryTimer = null;

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

  function fmtAge(s) {
    if (s === null || s === undefined) return "never";
    if (s < 10) return s.toFixed(1) + " s ago";
    if (s < 120) return Math.round(s) + " s ago";
    if (s < 7200) return Math.round(s / 60) + " min ago";
    return Math.round(s / 3600) + " h ago";
  }

  function elapsed() { return (performance.now() - receivedAt) / 1000; }

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
    source.addEventListener("state", function (e) { apply(JSON.parse(e.data)); });
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

  function apply(state) {
    latest = state;
    receivedAt = performance.now();
    if (state.history) {
      windowSeconds = state.history.window || 900;
      samples = state.history.samples.slice();
    }
    setText($("version"), "paddler " + state.version);
    renderTotals(state);
    renderFleet(state.upstreams);
    drawCharts();
  }

  function addSample(sample) {
    samples.push(sample);
    var horizon = sample.time - windowSeconds;
    while (samples.length && samples[0].time < horizon) samples.shift();
    drawCharts();
  }

  function renderTotals(state) {
    var t = state.totals, r = state.recent;
    setText($("t-upstreams"), t.upstreams.healthy + " / " + t.upstreams.total);
    setText($("t-slots-idle"), fmtInt(t.slots_idle));
    setText($("t-slots-processing"), fmtInt(t.slots_processing));
    setText($("t-slots-total"), fmtInt(t.slots_total));
    setText($("t-buffered"), fmtInt(t.requests_buffered));
    setText($("t-buffered-wait"), t.requests_buffered ? "oldest waits " + fmtSeconds(t.oldest_buffered_wait) : "");
    setText($("t-in-flight"), fmtInt(t.requests_in_flight));
    setText($("t-rps"), fmtRate(r.requests_per_second));
    var parts = [];
    Object.keys(state.requests.by_status).forEach(function (k) { parts.push(k + " " + state.requests.by_status[k]); });
    setText($("t-requests"), state.requests.total + " total" + (parts.length ? " · " + parts.join(" · ") : ""));
    setText($("t-ttft"), [r.ttft_p50, r.ttft_p95, r.ttft_p99].map(fmtSeconds).join(" / "));
    setText($("t-duration"), [r.duration_p50, r.duration_p95, r.duration_p99].map(fmtSeconds).join(" / "));
  }

  // -- fleet table --------------------------------------------------------

  function cell(tr, className) {
    var td = document.createElement("td");
    if (className) td.className = className;
    tr.appendChild(td);
    return td;
  }

  function makeRow(id) {
    var tr = document.createElement("tr");
    tr.dataset.upstream = id;
    var row = { tr: tr, text: "" };
    row.name = cell(tr, "name");
    row.url = cell(tr, "url");
    var stateCell = cell(tr, "state-cell");
    row.state = document.createElement("span");
    stateCell.appendChild(row.state);
    var slotsCell = cell(tr, "slots-cell");
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
    row.model = cell(tr, "model");
    row.age = cell(tr, "age");
    row.served = cell(tr, "num served");
    row.failed = cell(tr, "num failed");
    row.error = cell(tr, "error");
    return row;
  }

  function updateRow(row, u) {
    row.u = u;
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
    setText(row.model, u.model === null ? "–" : u.model);
    if (u.model !== null) row.model.title = u.models.join(", ");
    setText(row.served, u.requests_served);
    setText(row.failed, u.requests_failed);
    setText(row.error, u.last_error || "");
    row.error.title = u.last_error || "";
    row.text = [u.name, u.url, status, u.model || "", u.last_error || ""].join(" ").toLowerCase();
    row.tr.hidden = filterText !== "" && row.text.indexOf(filterText) < 0;
    updateAge(row);
  }

  function updateAge(row) {
    var age = row.u.last_update_age;
    setText(row.age, fmtAge(age === null ? null : age + elapsed()));
  }

  function renderFleet(upstreams) {
    var body = $("fleet-rows");
    var seen = new Set();
    upstreams.forEach(function (u, index) {
      seen.add(u.id);
      var row = rows.get(u.id);
      if (!row) {
        row = makeRow(u.id);
        rows.set(u.id, row);
      }
      updateRow(row, u);
      if (body.children[index] !== row.tr) body.insertBefore(row.tr, body.children[index] || null);
    });
    rows.forEach(function (row, id) {
      if (!seen.has(id)) {
        row.tr.remove();
        rows.delete(id);
      }
    });
    var shown = 0;
    rows.forEach(function (row) { if (!row.tr.hidden) shown += 1; });
    setText($("fleet-count"), filterText ? shown + " of " + upstreams.length : String(upstreams.length));
    $("fleet-empty").hidden = upstreams.length > 0;
  }

  function applyFilter() {
    filterText = $("filter").value.trim().toLowerCase();
    if (latest) renderFleet(latest.upstreams);
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

  function tick() { rows.forEach(updateAge); }

  document.addEventListener("DOMContentLoaded", function () {
    $("filter").addEventListener("input", applyFilter);
    window.addEventListener("resize", drawCharts);
    setInterval(tick, 1000);
    connect();
  });
  // For people poking from the console: the JSON snapshot URL.
  window.paddlerStateURL = STATE_URL;
})();
