// den's dashboard: live updates (server-sent events) and confirmations. Nothing else.
"use strict";

(function () {
  // A form with data-confirm asks first.
  document.addEventListener("submit", function (ev) {
    const form = ev.target;
    const question = form.getAttribute && form.getAttribute("data-confirm");
    if (question && !window.confirm(question)) ev.preventDefault();
  }, true);

  function markStates(root) {
    root.querySelectorAll(".state[data-field=state]").forEach(function (el) {
      el.setAttribute("data-state", el.textContent.trim());
    });
  }

  function when(value) {
    if (!value) return "";
    return String(value).replace("T", " ").slice(0, 16) + " UTC";
  }

  function setField(el, name, fields) {
    if (el.tagName === "PROGRESS") {
      if (fields.end) { el.max = fields.end; el.value = fields.now || 0; }
      return;
    }
    let v = fields[name];
    if (v === null || v === undefined) v = "";
    if (/_at$/.test(name)) v = when(v);
    if (el.children.length === 1 && el.firstElementChild.tagName === "A") {
      el.firstElementChild.textContent = String(v);  // keep the link
      if (name === "url") el.firstElementChild.href = String(v);
      return;
    }
    el.textContent = String(v);
    if (name === "state") el.setAttribute("data-state", String(v));
  }

  function rowsFor(kind, id) {
    return Array.prototype.filter.call(
      document.querySelectorAll("[data-kind='" + kind + "']"),
      function (el) { return el.getAttribute("data-id") === id; });
  }

  function addRow(ev) {
    document.querySelectorAll("table[data-list='" + ev.kind + "']").forEach(function (table) {
      const only = table.getAttribute("data-filter-workspace");
      if (only && ev.fields.workspace !== only) return;
      const tr = document.createElement("tr");
      tr.setAttribute("data-kind", ev.kind);
      tr.setAttribute("data-id", ev.id);
      table.querySelectorAll("thead th").forEach(function (th) {
        const td = document.createElement("td");
        const name = th.getAttribute("data-field");
        if (name === "progress") {
          const bar = document.createElement("progress");
          bar.setAttribute("data-field", "progress");
          td.appendChild(bar);
          setField(bar, name, ev.fields);
        } else if (name) {
          td.setAttribute("data-field", name);
          if (name === "state") td.className = "state";
          setField(td, name, ev.fields);
        }
        tr.appendChild(td);
      });
      table.tBodies[0].appendChild(tr);
      table.hidden = false;
    });
  }

  function apply(ev) {
    const rows = rowsFor(ev.kind, ev.id);
    if (ev.gone) {
      rows.forEach(function (r) { if (r.tagName === "TR") r.remove(); });
      return;
    }
    if (!rows.length) { addRow(ev); return; }
    rows.forEach(function (row) {
      row.querySelectorAll("[data-field]").forEach(function (el) {
        const name = el.getAttribute("data-field");
        if (name in ev.fields || el.tagName === "PROGRESS") setField(el, name, ev.fields);
      });
    });
  }

  function start() {
    markStates(document);
    const live = document.body.getAttribute("data-live");
    if (!live || !window.EventSource) return;
    let url = "/_den/events?kinds=" + encodeURIComponent(live);
    if (document.body.getAttribute("data-live-all")) url += "&all=1";
    const es = new EventSource(url);
    es.onmessage = function (m) {
      try { apply(JSON.parse(m.data)); } catch (e) { /* a bad event changes nothing */ }
    };
    window.denEvents = es;
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
