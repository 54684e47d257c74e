// den's admin pages: forms marked data-async (the Kill button of live sessions) post
// in the background, so the page stays and its live updates show the result (the row
// goes when the registry says the session is gone). den.js asks data-confirm first.
"use strict";

(function () {
  function showError(text) {
    const el = document.getElementById("async-error");
    if (!el) return;
    el.textContent = text;
    el.hidden = false;
  }

  document.addEventListener("submit", function (ev) {
    const form = ev.target;
    if (ev.defaultPrevented || !form.hasAttribute || !form.hasAttribute("data-async")) return;
    ev.preventDefault();
    const button = form.querySelector("button");
    if (button) button.disabled = true;
    fetch(form.action, {
      method: "POST",
      body: new URLSearchParams(new FormData(form)),
      headers: { "Accept": "application/json" },
      credentials: "same-origin",
    }).then(function (resp) {
      return resp.json();
    }).then(function (answer) {
      if (answer.error) {
        showError(answer.error.message || "failed");
        if (button) button.disabled = false;
      }
    }).catch(function () {
      showError("den did not answer");
      if (button) button.disabled = false;
    });
  });
})();
