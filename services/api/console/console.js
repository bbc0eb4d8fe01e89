// The dispatch console: zones on a map coloured by status, a meter ticking locally between
// updates, units, zones by urgency and a live feed. One websocket (/v1/ws/zones) carries the
// statuses; it reconnects by itself and resumes from the last sequence number it saw.
"use strict";

(() => {
  const ORDER = { due: 0, overstay: 1, active: 2, met: 3, satisfied: 4, inactive: 5 };
  const COLOURS = {
    due: "#d55e00", active: "#0072b2", met: "#009e73",
    overstay: "#cc79a7", satisfied: "#56b4e9", inactive: "#8c8c8c",
  };
  const FEED_MAX = 50;
  const LIST_MAX = 200; // rows rendered; the rest are counted (5,000 zones stay responsive)

  const zones = new Map(); // zone_id -> {status, receivedAt, layer, name}
  const units = new Map(); // unit_id -> marker
  let key = null;
  let seq = null;
  let epoch = null; // the numbering seq counts in: one per API process, so a seq needs it
  let socket = null;
  let retryMs = 1000;
  let selected = null;
  let listDirty = true;
  let unitsEtag = null;
  let map = null;
  let zoneLayer = null;
  const renderer = L.canvas({ padding: 0.3 });

  const $ = (id) => document.getElementById(id);
  const fmt = (s) => {
    s = Math.max(0, Math.floor(s));
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
    const mm = h ? String(m).padStart(2, "0") : String(m);
    return (h ? h + ":" : "") + mm + ":" + String(r).padStart(2, "0");
  };
  const api = (path, opts = {}) =>
    fetch(path, { ...opts, headers: { ...(opts.headers || {}), Authorization: "Bearer " + key } });

  function readKey() {
    const m = location.hash.match(/key=([^&]+)/);
    if (m) {
      key = decodeURIComponent(m[1]);
      localStorage.setItem("dosewatch.key", key);
      history.replaceState(null, "", location.pathname); // keep the key out of the address bar
    } else {
      key = localStorage.getItem("dosewatch.key");
    }
    return key;
  }

  function askKey() {
    const dialog = $("key-dialog");
    $("key-form").addEventListener("submit", () => {
      localStorage.setItem("dosewatch.key", $("key-input").value.trim());
      location.reload(); // start over with the new key
    }, { once: true });
    dialog.showModal();
  }

  // Elapsed time now, from the last status and the time since it arrived.
  function elapsedNow(z) {
    const s = z.status;
    if (!s || !s.occupied_since) return 0;
    return s.elapsed_s + (Date.now() - z.receivedAt) / 1000;
  }

  function style(status) {
    const c = COLOURS[status] || COLOURS.inactive;
    return { color: c, weight: 2, fillColor: c, fillOpacity: 0.45 };
  }

  function applyStatus(s) {
    let z = zones.get(s.zone_id);
    if (s.deleted) {
      if (z && z.layer) zoneLayer.removeLayer(z.layer);
      zones.delete(s.zone_id);
      listDirty = true;
      return;
    }
    if (!z) {
      z = { status: null, receivedAt: 0, layer: null, name: null };
      zones.set(s.zone_id, z);
    }
    const before = z.status ? z.status.status : null;
    z.status = s;
    z.receivedAt = Date.now();
    if (!z.layer) drawNewZones(); // created after this page loaded
    if (z.layer) z.layer.setStyle(style(s.status));
    if (before && before !== s.status) {
      feed(`${z.name || s.zone_id}: ${before} → ${s.status}`, s.status);
    }
    listDirty = true;
    if (selected === s.zone_id) renderDetail();
  }

  function feed(text, status) {
    const li = document.createElement("li");
    const time = new Date().toLocaleTimeString();
    // Text nodes only: zone names are free text from whoever drew the zones.
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.dataset.status = status;
    badge.textContent = status;
    li.append(badge, ` ${time} ${text}`);
    const list = $("feed");
    list.prepend(li);
    while (list.children.length > FEED_MAX) list.lastChild.remove();
  }

  function urgency(a, b) {
    const sa = a[1].status, sb = b[1].status;
    const oa = ORDER[sa ? sa.status : "inactive"], ob = ORDER[sb ? sb.status : "inactive"];
    if (oa !== ob) return oa - ob;
    if (sa && sa.status === "due") { // longest-waiting first: never dosed, then oldest dose
      const da = sa.last_dosed_end || "", db = sb.last_dosed_end || "";
      if (da !== db) return da < db ? -1 : 1;
    }
    return a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0;
  }

  function label(id, z) {
    const s = z.status;
    if (!s) return "";
    if (s.status === "active" || s.status === "met" || s.status === "overstay") {
      return `${fmt(elapsedNow(z))} / ${fmt(s.target_s)}`;
    }
    if (s.status === "due") return s.last_dosed_end ? "last dosed " + s.last_dosed_end.slice(11, 16) : "never dosed";
    return "";
  }

  function renderList() {
    const entries = [...zones.entries()].sort(urgency);
    const list = $("zone-list");
    const rows = entries.slice(0, LIST_MAX).map(([id, z]) => {
      const b = document.createElement("button");
      const st = z.status ? z.status.status : "inactive";
      b.dataset.zoneId = id;
      b.dataset.status = st;
      if (selected === id) b.setAttribute("aria-current", "true");
      const name = document.createElement("span");
      name.textContent = `${z.name || id} — ${st}`;
      const info = document.createElement("span");
      info.className = "timer";
      info.textContent = label(id, z);
      b.append(name, info);
      b.addEventListener("click", () => select(id));
      return li(b);
    });
    list.replaceChildren(...rows);
    $("zone-count").textContent = `(${entries.length}${entries.length > LIST_MAX ? ", first " + LIST_MAX + " shown" : ""})`;
    listDirty = false;
  }

  function textNode(text) {
    const span = document.createElement("span");
    span.textContent = text;
    return span;
  }

  function li(child) {
    const item = document.createElement("li");
    item.append(child);
    return item;
  }

  async function select(id) {
    selected = id;
    listDirty = true;
    const z = zones.get(id);
    if (z && z.layer) map.fitBounds(z.layer.getBounds(), { maxZoom: 17 });
    renderDetail();
    const visits = $("detail-visits");
    visits.replaceChildren();
    try {
      // History pages oldest first: ask for the last few hours and show the newest ten.
      const since = new Date(Date.now() - 4 * 3600 * 1000).toISOString();
      const q = `zone_id=${encodeURIComponent(id)}&from=${encodeURIComponent(since)}&limit=500`;
      const r = await api(`/v1/history/visits?${q}`);
      if (r.ok) {
        const rows = (await r.json()).rows || [];
        visits.replaceChildren(...rows.slice(-10).reverse().map((v) => {
          const item = document.createElement("li");
          item.textContent = `${v.unit_id} ${String(v.started_at).slice(11, 16)} ${fmt(v.duration_s)}`;
          return item;
        }));
      }
    } catch (e) { /* history is optional for the meter */ }
  }

  function renderDetail() {
    const z = zones.get(selected);
    const box = $("detail");
    if (!z || !z.status) { box.hidden = true; return; }
    const s = z.status;
    box.hidden = false;
    $("detail-title").textContent = z.name ? `${z.name} (${selected})` : selected;
    const badge = $("detail-status");
    badge.dataset.status = s.status;
    badge.textContent = s.status;
    $("detail-units").textContent = s.units_present.length ? "units: " + s.units_present.join(", ") : "no unit present";
    tickDetail();
    const sh = s.shift || {};
    $("detail-shift").textContent =
      `This shift: ${sh.visits || 0} visits, ${sh.dosed_visits || 0} dosed, ` +
      `${Math.round((sh.officer_s || 0) / 60)} patrol-minutes, ${Math.round((sh.presence_s || 0) / 60)} min presence`;
  }

  function tickDetail() {
    const z = zones.get(selected);
    if (!z || !z.status) return;
    const s = z.status;
    const e = elapsedNow(z);
    $("meter").max = s.target_s;
    $("meter").value = Math.min(e, s.target_s);
    $("meter-elapsed").textContent = fmt(e);
    $("meter-target").textContent = fmt(s.target_s);
    $("meter-remaining").textContent = fmt(s.occupied_since ? s.target_s - e : s.target_s);
  }

  function tick() {
    if (listDirty) {
      renderList();
    } else {
      for (const b of document.querySelectorAll("#zone-list button")) {
        const z = zones.get(b.dataset.zoneId);
        if (z) b.querySelector(".timer").textContent = label(b.dataset.zoneId, z);
      }
    }
    tickDetail();
  }

  function setConn(state, text) {
    const el = $("conn");
    el.dataset.state = state;
    el.textContent = text;
  }

  function connect() {
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    let url = `${proto}//${location.host}/v1/ws/zones?token=${encodeURIComponent(key)}`;
    if (seq !== null && epoch !== null) url += `&since=${encodeURIComponent(epoch)}:${seq}`;
    socket = new WebSocket(url);
    socket.onopen = () => { retryMs = 1000; setConn("open", "live"); };
    socket.onmessage = (ev) => {
      const frame = JSON.parse(ev.data);
      if (frame.type === "snapshot") {
        const seen = new Set();
        for (const s of frame.zones) { applyStatus(s); seen.add(s.zone_id); }
        // A zone missing from a snapshot is gone (deleted while this console was away).
        for (const id of [...zones.keys()]) if (!seen.has(id)) applyStatus({ zone_id: id, deleted: true });
      } else if (frame.type === "delta") {
        for (const s of frame.zones) applyStatus(s);
      }
      if (typeof frame.seq === "number" && typeof frame.epoch === "string") {
        seq = frame.seq;
        epoch = frame.epoch;
      }
    };
    socket.onclose = (ev) => {
      if (ev.code === 4401 || ev.code === 4403) {
        setConn("denied", ev.code === 4401 ? "key refused" : "not a dispatcher key");
        localStorage.removeItem("dosewatch.key");
        askKey();
        return;
      }
      if (ev.code === 4400) { seq = null; epoch = null; } // a since it refused: start afresh
      setConn("reconnecting", `reconnecting in ${Math.round(retryMs / 1000)} s…`);
      setTimeout(connect, retryMs);
      retryMs = Math.min(retryMs * 2, 10000);
    };
  }

  let drawPending = null;
  function drawNewZones() {
    if (drawPending || !zoneLayer) return;
    drawPending = setTimeout(async () => { // one reload for a burst of new zones
      try {
        const r = await api("/v1/map/zones");
        if (r.ok) {
          const geo = await r.json();
          geo.features = geo.features.filter((f) => { const z = zones.get(f.properties.zone_id); return !z || !z.layer; });
          zoneLayer.addData(geo);
        }
      } finally {
        drawPending = null;
      }
    }, 1000);
  }

  async function loadZones() {
    const r = await api("/v1/map/zones");
    if (r.status === 401 || r.status === 403) { localStorage.removeItem("dosewatch.key"); askKey(); return false; }
    const geo = await r.json();
    zoneLayer = L.geoJSON(geo, {
      renderer,
      style: () => style("due"),
      onEachFeature: (f, layer) => {
        const id = f.properties.zone_id;
        let z = zones.get(id);
        if (!z) { z = { status: null, receivedAt: 0, layer: null, name: null }; zones.set(id, z); }
        z.layer = layer;
        z.name = f.properties.name || null;
        if (z.status) layer.setStyle(style(z.status.status));
        layer.bindTooltip(() => {
          const s = zones.get(id) && zones.get(id).status;
          const tip = document.createElement("span"); // a node: Leaflet puts strings in as HTML
          tip.textContent = `${z.name || id}: ${s ? s.status : "…"}`;
          return tip;
        });
        layer.on("click", () => select(id));
      },
    }).addTo(map);
    if (geo.features.length) map.fitBounds(zoneLayer.getBounds());
    return true;
  }

  async function pollUnits() {
    try {
      const r = await api("/v1/map/units", unitsEtag ? { headers: { "If-None-Match": unitsEtag } } : {});
      if (r.status !== 200) return;
      unitsEtag = r.headers.get("ETag");
      const body = await r.json();
      const seen = new Set();
      for (const u of body.units) {
        seen.add(u.unit_id);
        let m = units.get(u.unit_id);
        if (!m) {
          m = L.circleMarker([u.lat, u.lon], { renderer, radius: 5, color: "#111", weight: 1, fillColor: "#fff", fillOpacity: 1 })
            .bindTooltip(textNode(u.unit_id)).addTo(map);
          units.set(u.unit_id, m);
        } else {
          m.setLatLng([u.lat, u.lon]);
        }
      }
      for (const [id, m] of units) if (!seen.has(id)) { map.removeLayer(m); units.delete(id); }
    } catch (e) { /* the next poll retries */ }
  }

  async function start() {
    const config = await (await fetch("/console/config.json")).json();
    map = L.map("map", { preferCanvas: true, zoomControl: true });
    if (config.basemap_url) {
      L.tileLayer(config.basemap_url, { attribution: config.basemap_attribution || "", maxZoom: 19 }).addTo(map);
    }
    map.setView([0, 0], 2);
    if (!(await loadZones())) return;
    connect();
    setInterval(tick, 1000);
    pollUnits();
    setInterval(pollUnits, 2000);
  }

  // For tests and the curious: what the console holds, without reading the canvas.
  window.dosewatch = {
    zoneStatus: (id) => (zones.get(id) && zones.get(id).status ? zones.get(id).status.status : null),
    renderedZones: () => [...zones.values()].filter((z) => z.layer).length,
    units: () => units.size,
    seq: () => seq,
    dropConnection: () => socket && socket.close(),
    fitAll: () => void (zoneLayer && map.fitBounds(zoneLayer.getBounds())),
    showTooltip: (id) => void (zones.get(id) && zones.get(id).layer.openTooltip()),
  };

  if (readKey()) start(); else askKey();
})();
