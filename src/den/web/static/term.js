// den's terminal page: xterm.js over the websocket /_den/term/OWNER/NAME.
// The protocol is described in den/web/term.py: binary frames are the terminal's
// bytes, text frames JSON control messages. The terminal's id and key stay in
// sessionStorage (this tab only), so a reload or a dropped connection re-attaches
// to the same shell while den keeps it (web_terminal_grace).
(function () {
  "use strict";
  var box = document.getElementById("terminal");
  if (!box || !window.Terminal || !window.FitAddon) {
    return;
  }
  var ref = box.getAttribute("data-ref");
  var status = document.getElementById("term-status");
  var storeKey = "den-term:" + ref;
  var FINAL = { 4000: true, 4001: true, 4003: true }; // den's close codes: do not reconnect
  var term = new window.Terminal({ cursorBlink: true, scrollback: 5000 });
  var fit = new window.FitAddon.FitAddon();
  var encoder = new TextEncoder();
  var sock = null;
  var retried = false;
  var ended = false;

  term.loadAddon(fit);
  term.open(box);
  fit.fit();
  window.denTerminal = term; // for tests and the curious: its buffer is the screen

  function say(state, text) {
    box.setAttribute("data-state", state);
    if (status) {
      status.textContent = text;
    }
  }

  function saved() {
    try {
      return JSON.parse(sessionStorage.getItem(storeKey) || "null");
    } catch (e) {
      return null;
    }
  }

  function address() {
    var scheme = location.protocol === "https:" ? "wss:" : "ws:";
    var url = scheme + "//" + location.host + "/_den/term/" + ref;
    var s = saved();
    if (s && s.id && s.key) {
      url += "?attach=" + encodeURIComponent(s.id) + "&key=" + encodeURIComponent(s.key);
    }
    return url;
  }

  function send(data) {
    if (sock && sock.readyState === WebSocket.OPEN) {
      sock.send(data);
    }
  }

  function sendSize() {
    send(JSON.stringify({ type: "resize", cols: term.cols, rows: term.rows }));
  }

  function control(msg) {
    if (msg.type === "attached") {
      sessionStorage.setItem(storeKey, JSON.stringify({ id: msg.id, key: msg.key }));
      retried = false;
      if (msg.resumed) {
        term.reset(); // the shell's recent output is replayed next
      }
      box.setAttribute("data-session", msg.id);
      say("attached", msg.resumed ? "Re-attached to the same shell." : "Connected.");
      sendSize();
    } else if (msg.type === "exit") {
      ended = true;
      sessionStorage.removeItem(storeKey);
      term.write("\r\n[the shell ended: " + msg.code + "]\r\n");
      say("ended", "The shell ended (status " + msg.code + ").");
    } else if (msg.type === "error") {
      ended = true;
      sessionStorage.removeItem(storeKey);
      term.write("\r\nden: " + msg.message + "\r\n");
      say("ended", "den: " + msg.message);
    }
  }

  function connect() {
    say("connecting", "Connecting…");
    sock = new WebSocket(address());
    sock.binaryType = "arraybuffer";
    sock.onmessage = function (ev) {
      if (typeof ev.data === "string") {
        try {
          control(JSON.parse(ev.data));
        } catch (e) {
          // not den's: ignored
        }
      } else {
        term.write(new Uint8Array(ev.data));
      }
    };
    sock.onclose = function (ev) {
      sock = null;
      if (ended) {
        return;
      }
      if (FINAL[ev.code]) {
        ended = true;
        if (ev.code !== 4001) {
          sessionStorage.removeItem(storeKey);
        }
        say("ended", "Closed by den: " + (ev.reason || ev.code) + ".");
        return;
      }
      if (!retried) {
        retried = true;
        say("reconnecting", "Connection lost; reconnecting…");
        setTimeout(connect, 500);
        return;
      }
      say("disconnected", "Disconnected. Reload the page to re-attach.");
    };
  }

  term.onData(function (data) {
    send(encoder.encode(data));
  });
  term.onBinary(function (data) {
    var bytes = new Uint8Array(data.length);
    for (var i = 0; i < data.length; i++) {
      bytes[i] = data.charCodeAt(i) & 0xff;
    }
    send(bytes);
  });
  term.onResize(sendSize);
  window.addEventListener("resize", function () {
    fit.fit();
  });
  connect();
  term.focus();
})();
