// The operator page: polls the job table once a second and streams the selected job's text.
(function () {
  "use strict";
  const api = "operator/api/";
  const $ = (id) => document.getElementById(id);
  let watched = null;
  let stream = null;
  let modelSet = false;

  function cell(row, text, cls) {
    const td = document.createElement("td");
    td.textContent = text === null || text === undefined ? "" : String(text);
    if (cls) td.className = cls;
    row.append(td);
    return td;
  }

  function renderJobs(jobs) {
    const body = $("jobs");
    body.replaceChildren();
    for (const job of jobs) {
      const row = document.createElement("tr");
      row.dataset.jobId = job.job_id;
      if (job.job_id === watched) row.className = "selected";
      cell(row, job.job_id.slice(0, 12));
      cell(row, job.user_id);
      cell(row, job.kind);
      const status = cell(row, "");
      const badge = document.createElement("span");
      badge.className = "status s-" + job.status;
      badge.textContent = job.status;
      status.append(badge);
      cell(row, job.tokens);
      cell(row, job.elapsed_s === null ? "" : job.elapsed_s.toFixed(1) + " s");
      cell(row, job.provider);
      row.addEventListener("click", () => watch(job.job_id));
      body.append(row);
    }
  }

  function renderLoads(loads) {
    const body = $("loads");
    body.replaceChildren();
    if (!loads.length) {
      const row = document.createElement("tr");
      const td = cell(row, "no job running or waiting for a slot", "muted");
      td.colSpan = 4;
      body.append(row);
    }
    for (const load of loads) {
      const row = document.createElement("tr");
      cell(row, load.user_id);
      cell(row, load.actor);
      cell(row, load.running);
      cell(row, load.waiting);
      body.append(row);
    }
  }

  async function refresh() {
    try {
      const response = await fetch(api + "state");
      const state = await response.json();
      if (!modelSet && state.default_model) {
        $("ask-model").value = state.default_model;
        modelSet = true;
      }
      renderJobs(state.jobs);
      renderLoads(state.loads);
      $("clock").textContent = new Date().toLocaleTimeString();
    } catch (error) {
      $("clock").textContent = "offline";
    }
  }

  function showStatus(status, reason) {
    $("watch-status").textContent = status;
    $("watch-status").className = "status s-" + status;
    $("watch-reason").textContent = reason || "";
    $("watch-cancel").disabled = ["completed", "failed", "cancelled"].includes(status);
  }

  function watch(jobId) {
    if (stream) stream.close();
    watched = jobId;
    for (const row of $("jobs").children) row.className = row.dataset.jobId === jobId ? "selected" : "";
    $("watch-id").textContent = jobId;
    history.replaceState(null, "", "#" + encodeURIComponent(jobId));
    $("watch-text").textContent = "";
    showStatus("", "");
    const text = $("watch-text");
    stream = LLMJobs.streamJob(jobId, {
      url: (id) => api + "jobs/" + encodeURIComponent(id) + "/events",
      onText: (piece) => {
        text.append(piece);
        text.scrollTop = text.scrollHeight;
      },
      onReset: () => { text.textContent = ""; },
      onStatus: (s) => showStatus(s.status, s.reason),
      onDone: (job) => showStatus(job.status, job.error),
    });
  }

  $("watch-cancel").addEventListener("click", async () => {
    if (!watched) return;
    await LLMJobs.cancelJob(watched, {url: (id) => api + "jobs/" + encodeURIComponent(id) + "/cancel"});
  });

  $("ask").addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = {user_id: $("ask-user").value, prompt: $("ask-prompt").value, model: $("ask-model").value || null};
    const max = parseInt($("ask-max").value, 10);
    if (max > 0) body.max_tokens = max;
    const response = await fetch(api + "jobs", {
      method: "POST",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify(body),
    });
    const answer = await response.json();
    if (!response.ok) {
      $("ask-note").textContent = "rejected: " + JSON.stringify(answer.detail);
      return;
    }
    $("ask-note").textContent = "queued " + answer.job_id.slice(0, 12);
    watch(answer.job_id);
    refresh();
  });

  const fromHash = decodeURIComponent(location.hash.slice(1));
  if (fromHash) watch(fromHash);
  window.addEventListener("hashchange", () => watch(decodeURIComponent(location.hash.slice(1))));
  refresh();
  setInterval(refresh, 1000);
})();
