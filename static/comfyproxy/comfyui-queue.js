// The class queue, shown inside a student's ComfyUI page (nginx injects this before </head>).
//
// It only shows the queue: nginx already routes ComfyUI's own "Queue" submission into the
// class queue, so nothing here is needed for correctness, and nothing here touches ComfyUI's
// code, its globals or `fetch`. Everything runs inside one closure and every entry point is
// guarded, so a fault here can never break ComfyUI.
//
// Data: this page is on the ComfyUI origin, authenticated by the instance's `comfy_access`
// cookie, so it talks to the instance's own queue endpoints next to ComfyUI's:
//   <instance>/queue-ws/            WebSocket: the owner's tasks, live (the state at once on connect)
//   <instance>/queue-status/        the same frame over HTTP, polled while the socket is down
//   <instance>/queue-cancel/<id>/   POST: leave the queue
// Language: the teaching site's `django_language` cookie (the host's cookies reach every
// port of it), else the browser's languages, else Chinese.
(function () {
  "use strict";

  const HOST_ID = "comfyui-queue-notification";
  const POLL_MS = 5000;
  const FIRST_RECONNECT_MS = 1000;
  const MAX_RECONNECT_MS = 30000;
  const DISMISS_FINISHED_MS = 8000;
  const FLASH_MS = 6000;
  const MAX_CARDS = 4;

  const TEXT = {
    "zh-hans": {
      busy: "⏳ 系统繁忙",
      starting: "⏳ 即将开始",
      afterOwnRun: "⏳ 等你的上一个任务完成后开始",
      paused: "⏸ 老师已暂停队列",
      ahead: "前方还有 {n} 人排队",
      capacity: "最多支持 {m} 人同时执行",
      wait: "预计等待约 {minutes} 分钟",
      waitUnderMinute: "预计等待不到 1 分钟",
      cancel: "取消排队",
      cancelling: "正在取消…",
      cancelFailed: "取消失败，请稍后再试",
      running: "⚙️ 正在执行",
      runningDetail: "你的工作流正在运行，结果会显示在 ComfyUI 中",
      completed: "✅ 执行完成",
      completedDetail: "结果已显示在 ComfyUI 中",
      failed: "❌ 执行失败",
      cancelled: "已取消",
      close: "关闭",
      offline: "与教学系统的连接已断开，正在重新连接…",
      reasons: {
        validation: "ComfyUI 拒绝了这个工作流",
        execution_error: "工作流运行时出错",
        timeout: "运行时间超过了允许的上限",
        comfy_unreachable: "无法连接到你的 ComfyUI",
        comfy_server_error: "ComfyUI 返回了错误",
        instance_stopped: "你的 ComfyUI 已停止",
        lost: "ComfyUI 丢失了这个任务",
        interrupted: "任务在 ComfyUI 中被中断",
        cancelled_by_owner: "你已取消这个任务",
        cancelled_by_teacher: "老师取消了这个任务",
      },
    },
    en: {
      busy: "⏳ The system is busy",
      starting: "⏳ Starting soon",
      afterOwnRun: "⏳ Starts after your current run",
      paused: "⏸ The teacher paused the queue",
      ahead: "{n} ahead of you in the queue",
      capacity: "Up to {m} can run at once",
      wait: "Estimated wait: about {minutes} min",
      waitUnderMinute: "Estimated wait: under a minute",
      cancel: "Leave the queue",
      cancelling: "Leaving…",
      cancelFailed: "Could not leave the queue; please try again",
      running: "⚙️ Running",
      runningDetail: "Your workflow is running; the results will appear in ComfyUI",
      completed: "✅ Finished",
      completedDetail: "The results are in ComfyUI",
      failed: "❌ The run failed",
      cancelled: "Cancelled",
      close: "Close",
      offline: "Lost the connection to the teaching system; reconnecting…",
      reasons: {
        validation: "ComfyUI rejected the workflow",
        execution_error: "The workflow failed while running",
        timeout: "The run took longer than allowed",
        comfy_unreachable: "Your ComfyUI could not be reached",
        comfy_server_error: "ComfyUI answered with an error",
        instance_stopped: "Your ComfyUI stopped",
        lost: "ComfyUI lost the task",
        interrupted: "The task was interrupted in ComfyUI",
        cancelled_by_owner: "You cancelled this task",
        cancelled_by_teacher: "A teacher cancelled this task",
      },
    },
  };

  const COLORS = {
    queued: "#ff9800",
    processing: "#1976d2",
    completed: "#2e7d32",
    failed: "#c62828",
    cancelled: "#616161",
  };

  const STYLE = `
    :host { all: initial; }
    .stack { position: fixed; top: 56px; right: 16px; z-index: 99999; display: flex;
      flex-direction: column; gap: 8px; max-width: min(360px, calc(100vw - 32px));
      font-family: system-ui, -apple-system, "Segoe UI", "Microsoft YaHei", sans-serif; }
    .card { color: #fff; padding: 14px 18px; border-radius: 8px; line-height: 1.5;
      box-shadow: 0 4px 12px rgba(0, 0, 0, 0.3); font-size: 14px; overflow-wrap: anywhere; }
    .title { font-size: 16px; margin-bottom: 6px; display: flex; justify-content: space-between; gap: 12px; }
    .errors { margin: 8px 0 0; padding: 8px; background: rgba(0, 0, 0, 0.2); border-radius: 4px;
      font: 12px/1.4 ui-monospace, monospace; white-space: pre-wrap; max-height: 200px; overflow: auto; }
    button { font: inherit; cursor: pointer; border-radius: 4px; }
    .leave { margin-top: 10px; padding: 4px 12px; color: #e65100; background: #fff; border: 0; }
    .leave:disabled { opacity: 0.6; cursor: default; }
    .close { padding: 0 4px; color: inherit; background: none; border: 0; font-size: 18px; line-height: 1; }
    .notice { color: #fff; background: #424242; padding: 8px 12px; border-radius: 8px; font-size: 12px; }
  `;

  function report(error) {
    try {
      console.warn("[comfyui-queue]", error);
    } catch (ignored) {
      // Nothing left to do: the notice must never break the page.
    }
  }

  // Every callback goes through this, so an error here stays here.
  function guarded(callback) {
    return function () {
      try {
        return callback.apply(this, arguments);
      } catch (error) {
        report(error);
        return undefined;
      }
    };
  }

  function chooseLanguage() {
    const cookie = document.cookie.split("; ").find((item) => item.startsWith("django_language="));
    const wanted = [cookie ? decodeURIComponent(cookie.slice("django_language=".length)) : ""].concat(
      Array.from(navigator.languages || [navigator.language || ""]),
    );
    for (const language of wanted) {
      const lowered = String(language).toLowerCase();
      if (lowered.startsWith("zh")) return "zh-hans";
      if (lowered.startsWith("en")) return "en";
    }
    return "zh-hans";
  }

  function fill(template, values) {
    return template.replace(/\{(\w+)\}/g, (match, name) => (name in values ? String(values[name]) : match));
  }

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // ComfyUI's own error shapes, readable: a /prompt refusal ({type, message, details}),
  // an execution_error ({node_type, node_id, exception_message}), and node_errors.
  function errorLines(task) {
    const lines = [];
    const error = task.error;
    if (typeof error === "string" && error) {
      lines.push(error);
    } else if (error && typeof error === "object") {
      const where = error.node_type ? `${error.node_type} #${error.node_id}: ` : "";
      const message = error.exception_message || error.message || "";
      const details = error.details ? ` (${error.details})` : "";
      if (message || details) lines.push(where + message + details);
    }
    const nodeErrors = task.node_errors && typeof task.node_errors === "object" ? task.node_errors : {};
    for (const nodeId of Object.keys(nodeErrors)) {
      const nodeError = nodeErrors[nodeId] || {};
      const name = nodeError.class_type ? `${nodeError.class_type} #${nodeId}` : `#${nodeId}`;
      for (const item of Array.isArray(nodeError.errors) ? nodeError.errors : []) {
        lines.push(`${name}: ${item.message || ""}${item.details ? ` – ${item.details}` : ""}`);
      }
    }
    return lines;
  }

  function start() {
    const instance = location.pathname.match(/^\/comfyui\/[^/]+\/[0-9]{1,5}\//);
    if (!instance) return;
    const base = instance[0];
    const text = TEXT[chooseLanguage()];

    let host = null;
    let stack = null;
    let lastFrame = null;
    // Tasks already finished when this page first heard of them are history, not news.
    let history = null;
    const dismissed = new Set();
    const cancelling = new Set();
    let offline = false;
    let flash = "";
    let flashTimer = null;
    let socket = null;
    let reconnectDelay = FIRST_RECONNECT_MS;
    let reconnectTimer = null;
    let pollTimer = null;
    let stopped = false;

    function mount() {
      if (host || !document.body) return;
      host = element("div");
      host.id = HOST_ID;
      host.setAttribute("data-comfyui-queue", "");
      const root = host.attachShadow({ mode: "open" });
      root.append(element("style", "", STYLE));
      stack = element("div", "stack");
      stack.setAttribute("role", "status");
      stack.setAttribute("aria-live", "polite");
      root.append(stack);
      document.body.append(host);
      render();
    }

    function isActive(task) {
      return task.status === "queued" || task.status === "processing";
    }

    function visibleTasks() {
      const tasks = (lastFrame && Array.isArray(lastFrame.tasks) ? lastFrame.tasks : []).filter(
        (task) => isActive(task) || !(history.has(task.task_id) || dismissed.has(task.task_id)),
      );
      const rank = (task) =>
        task.status === "processing" ? 0 : task.status === "queued" ? 1 + task.position / 1e6 : 2;
      return tasks.sort((a, b) => rank(a) - rank(b)).slice(0, MAX_CARDS);
    }

    function queuedCard(task, queue) {
      const card = element("div", "card");
      let title = text.busy;
      if (queue.paused) title = text.paused;
      else if (task.position <= queue.available_slots) title = task.after_own_run ? text.afterOwnRun : text.starting;
      card.append(element("div", "title", title));
      card.append(element("div", "ahead", fill(text.ahead, { n: task.position })));
      card.append(element("div", "capacity", fill(text.capacity, { m: queue.max_concurrent })));
      const seconds = Number(task.estimated_wait_seconds) || 0;
      if (seconds > 0) {
        const wait = seconds < 60 ? text.waitUnderMinute : fill(text.wait, { minutes: Math.ceil(seconds / 60) });
        card.append(element("div", "wait", wait));
      }
      const leave = element("button", "leave", cancelling.has(task.task_id) ? text.cancelling : text.cancel);
      leave.type = "button";
      leave.disabled = cancelling.has(task.task_id);
      leave.addEventListener("click", guarded(() => cancel(task.task_id)));
      card.append(leave);
      return card;
    }

    function finishedCard(task) {
      const card = element("div", "card");
      const title = element("div", "title");
      title.append(element("span", "", text[task.status] || task.status));
      const close = element("button", "close", "×");
      close.type = "button";
      close.title = text.close;
      close.setAttribute("aria-label", text.close);
      close.addEventListener("click", guarded(() => dismiss(task.task_id)));
      title.append(close);
      card.append(title);
      if (task.status === "completed") {
        card.append(element("div", "detail", text.completedDetail));
      } else {
        card.append(element("div", "reason", text.reasons[task.reason] || task.message || ""));
        const lines = errorLines(task);
        if (lines.length) card.append(element("pre", "errors", lines.join("\n")));
      }
      return card;
    }

    function card(task, queue) {
      let node;
      if (task.status === "queued") {
        node = queuedCard(task, queue);
      } else if (task.status === "processing") {
        node = element("div", "card");
        node.append(element("div", "title", text.running), element("div", "detail", text.runningDetail));
      } else {
        node = finishedCard(task);
      }
      node.style.background = COLORS[task.status] || COLORS.cancelled;
      node.dataset.status = task.status;
      node.dataset.taskId = task.task_id;
      return node;
    }

    function render() {
      if (!stack) return;
      const queue = (lastFrame && lastFrame.queue) || {};
      const tasks = lastFrame ? visibleTasks() : [];
      const cards = tasks.map((task) => card(task, queue));
      if (offline) cards.push(element("div", "notice", text.offline));
      if (flash) cards.push(element("div", "notice", flash));
      stack.replaceChildren(...cards);
      for (const task of tasks) {
        if (task.status === "completed" || task.status === "cancelled") scheduleDismiss(task.task_id);
      }
    }

    function showFlash(message) {
      flash = message;
      clearTimeout(flashTimer);
      flashTimer = setTimeout(
        guarded(() => {
          flash = "";
          render();
        }),
        FLASH_MS,
      );
      render();
    }

    const dismissTimers = new Map();
    function scheduleDismiss(taskId) {
      if (dismissTimers.has(taskId)) return;
      dismissTimers.set(taskId, setTimeout(guarded(() => dismiss(taskId)), DISMISS_FINISHED_MS));
    }

    function dismiss(taskId) {
      dismissed.add(taskId);
      render();
    }

    function receive(frame) {
      if (!frame || frame.type !== "queue") return;
      if (lastFrame && frame.as_of < lastFrame.as_of) return;
      if (history === null) {
        history = new Set((frame.tasks || []).filter((task) => !isActive(task)).map((task) => task.task_id));
      }
      lastFrame = frame;
      offline = false;
      render();
    }

    async function poll() {
      try {
        const response = await fetch(`${base}queue-status/`, {
          credentials: "same-origin",
          headers: { Accept: "application/json" },
          cache: "no-store",
        });
        if (response.status === 401 || response.status === 403) {
          // The ComfyUI access ended (logged out): ComfyUI itself stops working too.
          stop();
          return;
        }
        if (!response.ok) throw new Error(`queue-status answered ${response.status}`);
        receive(await response.json());
      } catch (error) {
        offline = true;
        render();
        report(error);
      }
    }

    function startPolling() {
      if (pollTimer === null && !stopped) {
        pollTimer = setInterval(guarded(poll), POLL_MS);
        poll();
      }
    }

    function stopPolling() {
      if (pollTimer !== null) {
        clearInterval(pollTimer);
        pollTimer = null;
      }
    }

    function scheduleReconnect() {
      if (reconnectTimer !== null || stopped) return;
      // Full backoff with jitter, so a restarted server is not met by the whole class at once.
      const delay = reconnectDelay * (0.5 + Math.random() / 2);
      reconnectDelay = Math.min(reconnectDelay * 2, MAX_RECONNECT_MS);
      reconnectTimer = setTimeout(
        guarded(() => {
          reconnectTimer = null;
          connect();
        }),
        delay,
      );
    }

    function connect() {
      if (stopped) return;
      const scheme = location.protocol === "https:" ? "wss:" : "ws:";
      try {
        socket = new WebSocket(`${scheme}//${location.host}${base}queue-ws/`);
      } catch (error) {
        report(error);
        startPolling();
        scheduleReconnect();
        return;
      }
      socket.addEventListener(
        "open",
        guarded(() => {
          reconnectDelay = FIRST_RECONNECT_MS;
          stopPolling();
        }),
      );
      socket.addEventListener(
        "message",
        guarded((event) => receive(JSON.parse(event.data))),
      );
      socket.addEventListener(
        "close",
        guarded(() => {
          socket = null;
          startPolling();
          scheduleReconnect();
        }),
      );
    }

    async function cancel(taskId) {
      cancelling.add(taskId);
      render();
      let refusal = "";
      try {
        const response = await fetch(`${base}queue-cancel/${encodeURIComponent(taskId)}/`, {
          method: "POST",
          credentials: "same-origin",
          headers: { Accept: "application/json" },
        });
        if (!response.ok) {
          const body = await response.json().catch(() => ({}));
          refusal = body.message || text.cancelFailed;
        }
      } catch (error) {
        refusal = text.cancelFailed;
        report(error);
      }
      cancelling.delete(taskId);
      // The socket brings the new state once the dispatcher broadcasts it; show it now.
      await poll();
      if (refusal) showFlash(refusal);
    }

    function stop() {
      stopped = true;
      stopPolling();
      if (reconnectTimer !== null) clearTimeout(reconnectTimer);
      if (socket) socket.close();
      lastFrame = null;
      offline = false;
      render();
    }

    if (document.readyState === "loading") {
      document.addEventListener("DOMContentLoaded", guarded(mount), { once: true });
    } else {
      mount();
    }
    connect();
  }

  guarded(start)();
})();
