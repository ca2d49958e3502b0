// The drive page, improved: uploads with a progress bar per file (one
// XMLHttpRequest per file, so each has its own bar), drag and drop anywhere
// on the page, and quick rename / delete without leaving the folder. Every
// action also works without this file: the page is plain HTML forms and links.
(function () {
  "use strict";

  var form = document.getElementById("upload-form");
  if (!form) return;
  var input = form.querySelector('input[type="file"]');
  var csrf = form.querySelector('input[name="csrf"]').value;
  var list = document.getElementById("uploads");
  var drop = document.getElementById("drop-overlay");

  function human(n) {
    var units = ["bytes", "KiB", "MiB", "GiB", "TiB"], i = 0;
    while (Math.round(n * 10) / 10 >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    // As the server's human_size (src/drive.py): "1 byte", "1.5 KiB", "3 MiB".
    if (i === 0) return n === 1 ? "1 byte" : n + " bytes";
    return (Math.round(n * 10) / 10) + " " + units[i];
  }

  // -- uploads ------------------------------------------------------------------
  var running = 0, failed = 0, succeeded = 0, renamed = [];

  function row(file) {
    var li = document.createElement("li");
    li.className = "upload";
    var name = document.createElement("span");
    name.className = "upload-name";
    name.textContent = file.name;
    var bar = document.createElement("progress");
    bar.max = 100; bar.value = 0;
    var status = document.createElement("span");
    status.className = "upload-status";
    status.textContent = "waiting";
    li.appendChild(name); li.appendChild(bar); li.appendChild(status);
    list.appendChild(li);
    list.hidden = false;
    return { li: li, bar: bar, status: status };
  }

  function explain(status) {
    if (status === 401 || status === 303 || status === 0) return "you are logged out; log in again and retry";
    if (status === 403) return "this page is out of date; reload it and retry";
    if (status === 404) return "this folder no longer exists";
    if (status === 413) return "the file is too large";
    if (status === 503) return "the storage is unavailable; try again in a moment";
    return "the server answered " + status;
  }

  function finished() {
    running--;
    if (running === 0) {
      var msg = succeeded + (succeeded === 1 ? " file uploaded" : " files uploaded");
      if (failed) msg += ", " + failed + " failed";
      // A name that was taken got " (2)"...: say so after the reload too.
      if (renamed.length) msg += " (" + renamed.join(", ") + ")";
      document.body.setAttribute("data-uploads-done", msg);
      if (!failed) {
        // Show the new files in the listing, and the message once more after the reload.
        try { window.sessionStorage.setItem("drive-notice", msg); } catch (err) { /* private mode */ }
        var url = new URL(window.location.href);
        ["ok", "err", "sig"].forEach(function (k) { url.searchParams.delete(k); });
        setTimeout(function () { window.location.assign(url.toString()); }, 400);
      }
    }
  }

  function upload(file) {
    var ui = row(file);
    running++;
    var data = new FormData();
    data.append("csrf", csrf);
    data.append("file", file, file.name);
    var xhr = new XMLHttpRequest();
    xhr.open("POST", form.action);
    xhr.setRequestHeader("X-CSRF-Token", csrf);
    xhr.setRequestHeader("Accept", "application/json");
    xhr.upload.onprogress = function (e) {
      if (e.lengthComputable) {
        var pct = Math.floor(100 * e.loaded / e.total);
        ui.bar.value = Math.min(pct, 99);  // 100 only once the server has stored it
        ui.status.textContent = pct + "% of " + human(file.size);
      }
    };
    xhr.onload = function () {
      var reply = null;
      try { reply = JSON.parse(xhr.responseText); } catch (err) { reply = null; }
      if (xhr.status >= 200 && xhr.status < 300) {
        ui.bar.value = 100;
        ui.li.classList.add("done");
        ui.status.textContent = reply && reply.name !== file.name ? "done, saved as " + reply.name : "done";
        if (reply && reply.name !== file.name) renamed.push(file.name + " saved as " + reply.name);
        succeeded++;
      } else {
        ui.li.classList.add("failed");
        ui.status.textContent = "failed: " + (reply && reply.error ? reply.error : explain(xhr.status));
        failed++;
      }
      finished();
    };
    xhr.onerror = function () {
      ui.li.classList.add("failed");
      ui.status.textContent = "failed: the connection was lost";
      failed++;
      finished();
    };
    ui.status.textContent = "starting";
    xhr.send(data);
  }

  function uploadAll(files) {
    for (var i = 0; i < files.length; i++) upload(files[i]);
  }

  form.addEventListener("submit", function (e) {
    // Picking files already started their uploads (below); the button then
    // just opens the picker again, so it never navigates away from running uploads.
    e.preventDefault();
    if (input.files && input.files.length) {
      uploadAll(input.files);
      input.value = "";
    } else {
      input.click();
    }
  });
  // Picking files starts the upload at once.
  input.addEventListener("change", function () {
    if (input.files && input.files.length) {
      uploadAll(input.files);
      input.value = "";
    }
  });

  // A message left by the uploads before the page reloaded.
  try {
    var notice = window.sessionStorage.getItem("drive-notice");
    if (notice) {
      window.sessionStorage.removeItem("drive-notice");
      var p = document.createElement("p");
      p.className = "notice ok";
      p.setAttribute("role", "status");
      p.textContent = notice;
      var tools = document.querySelector(".drive-tools");
      tools.parentNode.insertBefore(p, tools);
    }
  } catch (err) { /* no sessionStorage: no message */ }

  // -- drag and drop ------------------------------------------------------------------
  var depth = 0;
  function hasFiles(e) {
    var t = e.dataTransfer && e.dataTransfer.types;
    return t && Array.prototype.indexOf.call(t, "Files") >= 0;
  }
  document.addEventListener("dragenter", function (e) {
    if (!hasFiles(e)) return;
    depth++;
    drop.hidden = false;
  });
  document.addEventListener("dragleave", function (e) {
    if (!hasFiles(e)) return;
    depth = Math.max(0, depth - 1);
    if (depth === 0) drop.hidden = true;
  });
  document.addEventListener("dragover", function (e) {
    if (hasFiles(e)) e.preventDefault();
  });
  document.addEventListener("drop", function (e) {
    if (!hasFiles(e)) return;
    e.preventDefault();
    depth = 0;
    drop.hidden = true;
    uploadAll(e.dataTransfer.files);
  });

  // -- quick actions (the links lead to a page with a form when JS is off) -------------
  function post(action, fields) {
    var f = document.createElement("form");
    f.method = "post";
    f.action = action;
    fields.csrf = csrf;
    Object.keys(fields).forEach(function (k) {
      var i = document.createElement("input");
      i.type = "hidden"; i.name = k; i.value = fields[k];
      f.appendChild(i);
    });
    document.body.appendChild(f);
    f.submit();
  }

  document.addEventListener("click", function (e) {
    var a = e.target.closest && e.target.closest("a[data-action]");
    if (!a) return;
    var action = a.getAttribute("data-action");
    var name = a.getAttribute("data-name");
    var id = a.getAttribute("data-id");
    if (action === "rename") {
      e.preventDefault();
      var newName = window.prompt("New name for \u201c" + name + "\u201d:", name);
      if (newName === null || newName === name) return;
      post(a.getAttribute("data-post"), { name: name, id: id, new_name: newName });
    } else if (action === "delete") {
      e.preventDefault();
      var what = a.getAttribute("data-kind") === "folder"
        ? "the folder \u201c" + name + "\u201d and everything in it" : "\u201c" + name + "\u201d";
      if (!window.confirm("Delete " + what + "? This cannot be undone.")) return;
      post(a.getAttribute("data-post"), { name: name, id: id });
    }
  });
})();
