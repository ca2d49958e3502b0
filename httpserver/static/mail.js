// Webmail: the compose form works without this file. With it, a message
// cannot be sent twice by a double click, files too large for mail are
// refused before they upload (the server would refuse them after), a
// message with files shows a progress bar while they upload, and a send
// that met a frontend dying under it (the load balancer's 502/503/504) is
// sent again by itself: the form's send_key makes that safe, the server
// stores no second copy (the same POST, sent by XMLHttpRequest).
// A form with data-confirm (Delete on a message page: mail has no Trash)
// asks first; without this file it deletes at once.
document.addEventListener("submit", function (ev) {
  var question = ev.target.getAttribute && ev.target.getAttribute("data-confirm");
  if (question && !window.confirm(question)) ev.preventDefault();
}, true);

document.addEventListener("DOMContentLoaded", function () {
  var form = document.querySelector("form.mail-compose-form");
  if (!form) return;
  var button = form.querySelector("button[type=submit]");
  var label = button ? button.textContent : "";
  var status = document.createElement("div");
  status.className = "mail-progress";
  status.hidden = true;
  status.innerHTML = '<progress max="100" value="0"></progress> <span></span>';
  (button ? button.parentNode : form).appendChild(status);
  var bar = status.querySelector("progress");
  var text = status.querySelector("span");

  function idle() {
    delete form.dataset.sending;
    if (button) {
      button.textContent = label;
      button.removeAttribute("aria-disabled");
      button.classList.remove("mail-sending");
    }
  }

  function fileBytes() {
    var total = 0;
    form.querySelectorAll("input[type=file]").forEach(function (input) {
      for (var i = 0; i < input.files.length; i++) total += input.files[i].size;
    });
    return total;
  }

  // Files too large for mail, told at once instead of after a long upload.
  // Mail carries files in base64, a third larger (and a line break every 76
  // characters): estimate that, as the server counts the finished message.
  var maxBytes = parseInt(form.dataset.maxBytes, 10) || 0;
  var tooLarge = form.querySelector(".mail-too-large");

  function human(n) {
    var units = ["bytes", "KiB", "MiB", "GiB", "TiB"], i = 0;
    while (Math.round(n * 10) / 10 >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    // As the server's human_size (src/drive.py): "1 byte", "1.5 KiB", "3 MiB".
    if (i === 0) return n === 1 ? "1 byte" : n + " bytes";
    return (Math.round(n * 10) / 10) + " " + units[i];
  }

  // ... the files from the computer and the ticked drive files together.
  function chosenBytes() {
    var total = fileBytes();
    form.querySelectorAll("input[name=drive_file]:checked").forEach(function (box) {
      total += parseInt(box.dataset.size, 10) || 0;
    });
    return total;
  }

  function checkSize() {
    var raw = chosenBytes();
    var encoded = Math.ceil(raw / 3) * 4 * 78 / 76;
    var over = maxBytes > 0 && encoded > maxBytes;
    if (tooLarge) {
      tooLarge.hidden = !over;
      tooLarge.textContent = !over ? "" : "The files you chose are " + human(raw) +
        (raw > maxBytes ? "" : " (about " + human(encoded) + " once attached, as mail makes files a third larger)") +
        ", over the " + (form.dataset.maxSize || human(maxBytes)) +
        " mail limit. Choose smaller files (the limit is for the whole message, as it travels).";
    }
    return !over;
  }
  form.querySelectorAll("input[type=file], input[name=drive_file]").forEach(function (input) {
    input.addEventListener("change", checkSize);
  });

  // Coming back to this page (the Back button) makes the form usable again.
  window.addEventListener("pageshow", function () { idle(); status.hidden = true; });

  form.addEventListener("submit", function (ev) {
    if (form.dataset.sending) { ev.preventDefault(); return; }
    if (!checkSize()) {
      ev.preventDefault();
      if (tooLarge) tooLarge.scrollIntoView({block: "center"});
      return;
    }
    form.dataset.sending = "1";
    if (button) {
      button.textContent = "Sending…";
      button.setAttribute("aria-disabled", "true");
      button.classList.add("mail-sending");
    }
    if (!window.FormData || !window.XMLHttpRequest) return;  // the plain form post

    ev.preventDefault();
    var data = new FormData(form);
    var withFiles = fileBytes() > 0;
    var attempts = 0;
    if (withFiles) {
      status.hidden = false;
      text.textContent = "Uploading…";
    }

    function post() {
      attempts++;
      var xhr = new XMLHttpRequest();
      xhr.open("POST", form.action);
      xhr.upload.addEventListener("progress", function (e) {
        if (!withFiles || !e.lengthComputable) return;
        var pct = Math.floor(100 * e.loaded / e.total);
        bar.value = pct;
        text.textContent = pct < 100 ? "Uploading… " + pct + "%" : "Sending…";
      });
      xhr.addEventListener("load", function () {
        var url = xhr.responseURL || "";
        if (xhr.status === 200 && /\/mail\/sent(\?|$)/.test(url.replace(/^https?:\/\/[^/]+/, ""))) {
          window.location.href = url;  // sent: show the Sent folder, as the plain post would
          return;
        }
        if ((xhr.status === 502 || xhr.status === 503 || xhr.status === 504) && attempts < 3) {
          // A web server died or restarted under the send: again, elsewhere.
          status.hidden = false;
          text.textContent = "A web server was restarting: sending again…";
          setTimeout(post, 500 * attempts);
          return;
        }
        // An error page or the form with its error message: show it as it is,
        // from the top (where the message is; the page kept its scroll position).
        document.open();
        document.write(xhr.responseText);
        document.close();
        window.scrollTo(0, 0);
      });
      xhr.addEventListener("error", function () {
        idle();
        bar.value = 0;
        status.hidden = false;
        text.textContent = "The message could not be sent: the connection failed. Try again " +
          "(pressing Send again never sends it twice).";
      });
      xhr.send(data);
    }
    post();
  });
});
