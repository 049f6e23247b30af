// Browser client of the LLM jobs web API. No build step: <script src="static/client.js"></script>.
//
//   const stream = LLMJobs.streamJob(job.job_id, {token: job.stream_token, onText, onStatus, onReset, onDone});
//   stream.close();
//   await LLMJobs.cancelJob(job.job_id, {headers: {...}});
//
// The stream resumes after the last event it saw: the browser's own reconnects send Last-Event-ID,
// and when the browser gives up (an error status, say) the client opens a new stream after it.
(function (global) {
  "use strict";

  function join(base, path) {
    if (!base) return path;
    return base.endsWith("/") ? base + path : base + "/" + path;
  }

  function streamJob(jobId, options) {
    const opts = options || {};
    let lastEventId = opts.lastEventId || null;
    let source = null;
    let closed = false;
    let retryMs = 500;

    function url() {
      const path = opts.url ? opts.url(jobId) : join(opts.baseUrl || "", "jobs/" + encodeURIComponent(jobId) + "/events");
      const params = new URLSearchParams();
      const token = typeof opts.token === "function" ? opts.token() : opts.token;
      if (token) params.set("token", token);
      if (lastEventId) params.set("last_event_id", lastEventId);
      const query = params.toString();
      return query ? path + (path.includes("?") ? "&" : "?") + query : path;
    }

    function seen(event) {
      if (event.lastEventId) lastEventId = event.lastEventId;
      retryMs = 500;
    }

    function open() {
      if (closed) return;
      source = new EventSource(url(), {withCredentials: !!opts.withCredentials});
      source.addEventListener("text", (event) => {
        seen(event);
        if (opts.onText) opts.onText(event.data, event.lastEventId);
      });
      source.addEventListener("reset", (event) => {
        seen(event);
        if (opts.onReset) opts.onReset();
      });
      source.addEventListener("status", (event) => {
        seen(event);
        if (opts.onStatus) opts.onStatus(JSON.parse(event.data));
      });
      source.addEventListener("done", (event) => {
        seen(event);
        close();
        if (opts.onDone) opts.onDone(JSON.parse(event.data));
      });
      source.onerror = () => {
        if (closed) return;
        if (opts.onError) opts.onError();
        if (source.readyState === EventSource.CLOSED) {
          // The browser gave up: open a new stream after the last event seen, backing off to 10 s.
          setTimeout(open, retryMs);
          retryMs = Math.min(retryMs * 2, 10000);
        }
      };
    }

    function close() {
      closed = true;
      if (source) source.close();
    }

    open();
    return {
      close: close,
      get lastEventId() {
        return lastEventId;
      },
    };
  }

  async function cancelJob(jobId, options) {
    const opts = options || {};
    const path = opts.url ? opts.url(jobId) : join(opts.baseUrl || "", "jobs/" + encodeURIComponent(jobId) + "/cancel");
    const response = await fetch(path, {
      method: "POST",
      headers: opts.headers || {},
      credentials: opts.credentials || "same-origin",
    });
    if (!response.ok) throw new Error("cancel failed: HTTP " + response.status);
    return (await response.json()).cancelled;
  }

  global.LLMJobs = {streamJob: streamJob, cancelJob: cancelJob};
})(window);
