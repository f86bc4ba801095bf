// The practice page: start and stop the student's own ComfyUI and show it in the iframe.
// All wording comes from the page (translated by Django) or from the API's messages.
(function () {
  "use strict";

  const root = document.getElementById("practice");
  if (!root) {
    return;
  }
  const ui = {
    status: document.getElementById("practice-status"),
    error: document.getElementById("practice-error"),
    start: document.getElementById("start-button"),
    stop: document.getElementById("stop-button"),
    open: document.getElementById("open-link"),
    frame: document.getElementById("comfy-frame"),
    placeholder: document.getElementById("frame-placeholder"),
  };
  const text = root.dataset;
  const csrfToken = root.querySelector("input[name=csrfmiddlewaretoken]").value;

  // While the page is visible it reports presence (so the instance is not stopped as idle)
  // and learns whether the instance stopped; faster while a start or stop is under way.
  const PRESENCE_INTERVAL_MS = 30000;
  const TRANSITION_INTERVAL_MS = 2000;

  let state = JSON.parse(document.getElementById("practice-state").textContent);
  let busy = false;
  // What a start or stop under way will lead to, for the spinner ("starting"/"stopping").
  let pendingState = null;
  let pollTimer = null;

  class ApiError extends Error {
    constructor(message, code) {
      super(message);
      this.code = code;
    }
  }

  async function call(url) {
    let response;
    try {
      response = await fetch(url, {
        method: "POST",
        credentials: "same-origin",
        headers: { "X-CSRFToken": csrfToken, Accept: "application/json" },
      });
    } catch (networkFailure) {
      throw new ApiError(text.textNetworkError, "network");
    }
    let body = null;
    try {
      body = await response.json();
    } catch (notJson) {
      body = null;
    }
    if (!response.ok) {
      throw new ApiError((body && body.message) || text.textNetworkError, body && body.code);
    }
    return body;
  }

  function transitioning() {
    return state.state === "starting" || state.state === "stopping";
  }

  function showError(message) {
    ui.error.textContent = message || "";
    ui.error.hidden = !message;
  }

  function render() {
    root.dataset.state = pendingState || state.state;
    if (!busy) {
      ui.status.textContent = state.message;
    }
    ui.start.disabled = busy || state.running || transitioning();
    ui.stop.disabled = busy || !state.running;
    ui.open.hidden = !state.running;
    if (state.running) {
      // The contract's path: on the teaching site nginx turns it into a fresh entry to ComfyUI.
      ui.open.href = state.url;
      // Load the frame once per instance: a reload would lose the student's unsaved graph.
      if (ui.frame.dataset.instanceUrl !== state.url) {
        ui.frame.dataset.instanceUrl = state.url;
        ui.frame.src = state.iframe_url;
      }
      ui.frame.hidden = false;
      ui.placeholder.hidden = true;
    } else {
      delete ui.frame.dataset.instanceUrl;
      ui.frame.removeAttribute("src");
      ui.frame.hidden = true;
      ui.placeholder.hidden = false;
    }
  }

  async function act(url, progressText, willBe) {
    busy = true;
    pendingState = willBe;
    showError("");
    ui.status.textContent = progressText;
    render();
    try {
      state = await call(url);
    } catch (error) {
      showError(error.message);
      await refresh();
    } finally {
      busy = false;
      pendingState = null;
      render();
      schedulePoll();
    }
  }

  async function refresh() {
    try {
      state = await call(text.presenceUrl);
    } catch (error) {
      showError(error.message);
    }
  }

  function schedulePoll() {
    clearTimeout(pollTimer);
    if (document.visibilityState !== "visible") {
      return;
    }
    const delay = transitioning() ? TRANSITION_INTERVAL_MS : PRESENCE_INTERVAL_MS;
    pollTimer = setTimeout(async function () {
      if (!busy) {
        await refresh();
        render();
      }
      schedulePoll();
    }, delay);
  }

  ui.start.addEventListener("click", function () {
    act(text.startUrl, text.textStarting, "starting");
  });
  ui.stop.addEventListener("click", function () {
    if (window.confirm(text.textConfirmStop)) {
      act(text.stopUrl, text.textStopping, "stopping");
    }
  });
  document.addEventListener("visibilitychange", async function () {
    if (document.visibilityState === "visible" && !busy) {
      await refresh();
      render();
    }
    schedulePoll();
  });

  render();
  schedulePoll();
})();
