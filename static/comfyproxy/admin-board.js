// The teacher's live queue board in admin. It draws the teacher frame of the queue socket
// ({"type": "queue", "as_of", "queue", "tasks", "board": {"running", "waiting", "finished"}}),
// first the one the page was rendered with, then every broadcast; it never polls. The
// durations tick once a second against the server's clock.
(function () {
  "use strict";

  const root = document.querySelector("[data-board]");
  const config = JSON.parse(document.getElementById("comfy-board-config").textContent);
  const text = config.text;
  const csrfToken = root.querySelector("input[name=csrfmiddlewaretoken]").value;
  // Server time minus browser time, so "running for" does not depend on the PC's clock.
  const clockOffsetMs = config.serverNow * 1000 - Date.now();
  let lastAsOf = -Infinity;
  let reconnectDelayMs = 1000;

  function serverNowMs() {
    return Date.now() + clockOffsetMs;
  }

  function formatDuration(seconds) {
    const total = Math.max(0, Math.floor(seconds));
    const hours = Math.floor(total / 3600);
    const minutes = Math.floor((total % 3600) / 60);
    const secs = String(total % 60).padStart(2, "0");
    return hours ? `${hours}:${String(minutes).padStart(2, "0")}:${secs}` : `${minutes}:${secs}`;
  }

  function element(tag, properties, children) {
    const node = document.createElement(tag);
    Object.assign(node, properties || {});
    for (const child of children || []) {
      node.append(child);
    }
    return node;
  }

  function taskLink(task) {
    return element("a", { href: config.taskUrl.replace("00000000-0000-0000-0000-000000000000", task.task_id), textContent: task.username });
  }

  // A cell whose text the clock refreshes: time since an instant, or until one.
  function clockCell(kind, instantMs) {
    const cell = element("td");
    cell.dataset.clock = kind;
    cell.dataset.instant = String(instantMs);
    return cell;
  }

  function actionForm(action, task, label) {
    return element("form", { method: "post", action: config.actionUrl, className: "comfy-board-action" }, [
      element("input", { type: "hidden", name: "csrfmiddlewaretoken", value: csrfToken }),
      element("input", { type: "hidden", name: "action", value: action }),
      element("input", { type: "hidden", name: "task", value: task.task_id }),
      element("button", { type: "submit", className: "button", textContent: label }),
    ]);
  }

  function actionsCell(task, actions) {
    const cell = element("td", { className: "comfy-board-actions" });
    if (config.canAct) {
      for (const [action, label] of actions) {
        cell.append(actionForm(action, task, label));
      }
    }
    return cell;
  }

  function fillTable(name, rows, emptyText, columns) {
    const body = root.querySelector(`[data-table="${name}"] tbody`);
    body.replaceChildren();
    if (!rows.length) {
      body.append(element("tr", {}, [element("td", { colSpan: columns, className: "comfy-board-empty", textContent: emptyText })]));
      return;
    }
    for (const row of rows) {
      body.append(row);
    }
  }

  function instanceText(task) {
    return task.port ? `${task.username} :${task.port}` : "–";
  }

  function runningRow(task) {
    // A running task has a reason only once someone asked to stop it.
    const stopping = Boolean(task.reason);
    return element("tr", { className: stopping ? "comfy-board-stopping" : "" }, [
      element("td", {}, stopping ? [taskLink(task), ` (${text.stopping})`] : [taskLink(task)]),
      element("td", { textContent: instanceText(task) }),
      clockCell("since", Date.parse(task.started_at)),
      actionsCell(task, stopping ? [] : [["interrupt", text.interrupt]]),
    ]);
  }

  function waitingRow(task, queue, asOfMs) {
    const startsNow = !queue.paused && task.position <= queue.available_slots;
    const eta = startsNow
      ? element("td", { textContent: task.after_own_run ? task.message : text.startsNow })
      : clockCell("until", asOfMs + task.estimated_wait_seconds * 1000);
    return element("tr", {}, [
      element("td", { textContent: String(task.position) }),
      element("td", {}, [taskLink(task)]),
      element("td", { textContent: instanceText(task) }),
      clockCell("since", Date.parse(task.queued_at)),
      eta,
      actionsCell(task, [
        ["move_to_front", text.toFront],
        ["cancel", text.cancel],
      ]),
    ]);
  }

  function finishedRow(task) {
    const finished = new Date(task.finished_at);
    return element("tr", { className: `comfy-board-${task.status}` }, [
      element("td", {}, [taskLink(task)]),
      element("td", { textContent: text.statuses[task.status] || task.status }),
      element("td", { textContent: task.status === "completed" ? "" : task.message }),
      element("td", { textContent: finished.toLocaleTimeString() }),
    ]);
  }

  function render(frame) {
    const queue = frame.queue;
    const board = frame.board;
    const asOfMs = frame.as_of * 1000;
    for (const figure of root.querySelectorAll("[data-figure]")) {
      figure.textContent = String(queue[figure.dataset.figure]);
    }
    root.querySelector("[data-paused]").hidden = !queue.paused;
    root.classList.toggle("comfy-board-is-paused", queue.paused);
    for (const button of root.querySelectorAll("[data-show-when]")) {
      button.hidden = button.dataset.showWhen !== (queue.paused ? "paused" : "running");
    }
    const cap = root.querySelector("input[name=cap]");
    if (cap) {
      cap.placeholder = String(queue.max_concurrent);
    }
    fillTable("running", board.running.map(runningRow), text.nothingRunning, 4);
    fillTable("waiting", board.waiting.map((task) => waitingRow(task, queue, asOfMs)), text.nobodyWaiting, 6);
    fillTable("finished", board.finished.map(finishedRow), text.nothingFinished, 4);
    tick();
  }

  function tick() {
    const now = serverNowMs();
    for (const cell of root.querySelectorAll("[data-clock]")) {
      const instant = Number(cell.dataset.instant);
      const seconds = cell.dataset.clock === "since" ? (now - instant) / 1000 : (instant - now) / 1000;
      cell.textContent = cell.dataset.clock === "until" && seconds <= 0 ? text.startsNow : formatDuration(seconds);
    }
  }

  function accept(frame) {
    if (frame.type !== "queue" || !frame.board || frame.as_of < lastAsOf) {
      return;
    }
    lastAsOf = frame.as_of;
    render(frame);
  }

  function showConnection(live) {
    const status = root.querySelector("[data-connection]");
    status.textContent = live ? text.live : text.reconnecting;
    status.classList.toggle("comfy-board-offline", !live);
  }

  function connect() {
    const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
    const socket = new WebSocket(`${scheme}//${window.location.host}${config.socketPath}`);
    socket.addEventListener("open", () => {
      reconnectDelayMs = 1000;
      showConnection(true);
    });
    socket.addEventListener("message", (event) => accept(JSON.parse(event.data)));
    socket.addEventListener("close", () => {
      showConnection(false);
      // Back off up to 15 s, with jitter so a restarted server is not hit by every board at once.
      window.setTimeout(connect, reconnectDelayMs * (0.5 + Math.random()));
      reconnectDelayMs = Math.min(reconnectDelayMs * 2, 15000);
    });
  }

  accept(config.initial);
  window.setInterval(tick, 1000);
  connect();
})();
