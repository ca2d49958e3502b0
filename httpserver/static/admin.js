// Admin console: keeps the process table and the tablet map fresh, and asks
// before every action. Without JavaScript the page still works: reload it,
// and actions show a confirmation page instead of a dialog.
(function () {
  "use strict";

  // Confirm actions with a dialog; the hidden field tells the server not to ask again.
  document.addEventListener("submit", function (ev) {
    var form = ev.target;
    if (!form.matches || !form.matches("form[data-confirm]")) return;
    if (!window.confirm(form.getAttribute("data-confirm"))) {
      ev.preventDefault();
      return;
    }
    if (!form.querySelector("input[name=confirm]")) {
      var input = document.createElement("input");
      input.type = "hidden";
      input.name = "confirm";
      input.value = "yes";
      form.appendChild(input);
    }
    var button = form.querySelector("button");
    if (button) { button.disabled = true; button.textContent = "Working…"; }
  });

  var updated = document.getElementById("adm-updated");
  var procs = document.getElementById("adm-procs");
  var map = document.getElementById("adm-map");
  if (!updated || !procs || !map) return;  // not the console page
  var every = (parseFloat(updated.getAttribute("data-refresh")) || 2) * 1000;
  var busy = false;

  function refresh() {
    // Never swap the table under a user who is about to click in it.
    if (busy || document.hidden || procs.contains(document.activeElement)) return;
    busy = true;
    fetch("/admin/status.json", { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (r) {
        if (!r.ok) throw new Error("HTTP " + r.status);
        return r.json();
      })
      .then(function (data) {
        // The fragments are rendered and HTML-escaped by the server.
        procs.innerHTML = data.html.processes;
        map.innerHTML = data.html.map;
        updated.textContent = "Updated " + data.updated;
        updated.classList.remove("adm-stale");
      })
      .catch(function () {
        updated.textContent = "Cannot reach the server; retrying…";
        updated.classList.add("adm-stale");
      })
      .then(function () { busy = false; });
  }
  setInterval(refresh, every);
})();
