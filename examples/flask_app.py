"""An ordinary Flask app with a live feed: ``gunicorn -k gevent examples.flask_app:app``.

One line makes it able to hold its clients in the reactor::

    app.wsgi_app = HijackMiddleware(app.wsgi_app)

Routes:

- ``GET /?channel=NAME``: a page whose ``EventSource`` lists the channel's
  messages live, with a form that publishes to it (channel ``lobby`` by
  default). Open it in two windows and publish from one.
- ``GET /events?channel=NAME``: the Server-Sent Events stream the page reads;
  a reconnecting ``EventSource`` sends ``Last-Event-ID`` and gets what it
  missed, each message once.
- ``POST /publish``: form fields ``channel`` and ``data``; answers ``202`` and
  ``{"id": N}``. The demo's rule applies: loopback clients only, unless
  ``WSGI_HIJACK_PUBLISH_TOKEN`` is set, and then a bearer token is needed.
- ``POST /admin/drop``: loopback only; closes every connection the worker
  holds, as a network failure would, to watch the clients reconnect.

The bus is in-process: run one worker (the default), or use the Redis bus.
"""

from __future__ import annotations

import ipaddress

from flask import Flask, Response, render_template_string, request

from wsgi_hijack import HijackMiddleware, get_reactor
from wsgi_hijack.bus import CHANNEL_RE, PublishError, publish
from wsgi_hijack.config import max_message
from wsgi_hijack.demo import may_publish
from wsgi_hijack.streams import framework_response, sse_response

app = Flask(__name__)
# Form encoding may triple a message's size; the bus checks the real limit.
app.config["MAX_CONTENT_LENGTH"] = 3 * max_message() + 4096
app.wsgi_app = HijackMiddleware(app.wsgi_app)

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Live feed: {{ channel }}</title>
<style>
  body { font: 16px/1.4 system-ui, sans-serif; margin: 2em auto; max-width: 40em; color: #222; }
  h1 { font-size: 1.4em; margin-bottom: .2em; }
  #status { display: inline-block; padding: .1em .6em; border-radius: 1em; color: #fff;
            background: #888; font-size: .85em; }
  #status.open { background: #2a7d2a; }
  #status.reconnecting { background: #b36b00; }
  form { margin: 1em 0; display: flex; gap: .5em; }
  form input[name=data] { flex: 1; padding: .3em; }
  #feed { list-style: none; padding: 0; border-top: 1px solid #ddd; }
  #feed li { padding: .3em 0; border-bottom: 1px solid #eee; }
  #feed li .id { color: #888; font-family: monospace; margin-right: .6em; }
  #feed li.gap { color: #a00; }
</style>
</head>
<body>
<h1>Channel <code>{{ channel }}</code></h1>
<p>Stream: <span id="status">connecting</span>
   <small>(connected <span id="opens">0</span> times)</small></p>
<form id="publish" method="post" action="{{ url_for('publish_message') }}">
  <input type="hidden" name="channel" value="{{ channel }}">
  <input name="data" placeholder="Say something" autocomplete="off" required>
  <button type="submit">Publish</button>
</form>
<p id="published"></p>
<ul id="feed"></ul>
<script>
(function () {
  "use strict";
  var channel = {{ channel|tojson }};
  var feed = document.getElementById("feed");
  var status = document.getElementById("status");
  var opens = 0;

  function show(state) { status.textContent = state; status.className = state; }

  function add(id, text, cls) {
    var li = document.createElement("li");
    if (cls) li.className = cls;
    if (id) li.dataset.id = id;
    var num = document.createElement("span");
    num.className = "id";
    num.textContent = id ? "#" + id : "!";
    li.appendChild(num);
    li.appendChild(document.createTextNode(text));
    feed.appendChild(li);
  }

  var source = new EventSource({{ url_for('events')|tojson }} +
                               "?channel=" + encodeURIComponent(channel));
  source.onopen = function () {
    opens += 1;
    document.getElementById("opens").textContent = opens;
    show("open");
  };
  // EventSource reconnects by itself, sending Last-Event-ID: the server
  // replays what was missed.
  source.onerror = function () {
    show(source.readyState === EventSource.CLOSED ? "closed" : "reconnecting");
  };
  source.onmessage = function (event) { add(event.lastEventId, event.data); };
  source.addEventListener("gap", function () {
    add("", "some messages were lost while disconnected", "gap");
  });

  var form = document.getElementById("publish");
  form.addEventListener("submit", function (event) {
    event.preventDefault();
    var result = document.getElementById("published");
    fetch(form.action, { method: "POST", body: new URLSearchParams(new FormData(form)) })
      .then(function (response) {
        return response.json().then(function (body) {
          result.textContent = response.ok ? "Published #" + body.id : "Refused: " + body.error;
          if (response.ok) form.elements.data.value = "";
        });
      })
      .catch(function (error) { result.textContent = "Failed: " + error; });
  });
})();
</script>
</body>
</html>
"""


@app.get("/")
def index():
    channel = request.args.get("channel", "lobby")
    if not CHANNEL_RE.fullmatch(channel):
        return {"error": f"invalid channel name {channel!r}"}, 400
    return render_template_string(PAGE, channel=channel)


@app.get("/events")
def events():
    if request.method == "HEAD":  # a HEAD must not be held as a stream
        return {"error": "use GET"}, 405, {"Allow": "GET"}
    status, headers, body = framework_response(
        sse_response, request.environ, request.args.getlist("channel"))
    return Response(body, status=status, headers=headers)


@app.post("/publish")
def publish_message():
    allowed, status, reason = may_publish(request.environ)
    if not allowed:
        extra = {"WWW-Authenticate": "Bearer"} if status.startswith("401") else {}
        return {"error": reason}, int(status[:3]), extra
    try:
        message_id = publish(request.form.get("channel", ""), request.form.get("data", ""))
    except PublishError as exc:
        return {"error": str(exc)}, 400
    return {"id": message_id}, 202


@app.post("/admin/drop")
def drop_connections():
    if not _loopback(request.remote_addr):
        return {"error": "only loopback clients may drop connections"}, 403
    return {"dropped": get_reactor().drop_all()}


def _loopback(address: str | None) -> bool:
    try:
        return ipaddress.ip_address(address or "").is_loopback
    except ValueError:
        return False
