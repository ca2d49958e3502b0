// Webmail: the compose form works without this file. With it, a message
// cannot be sent twice by a double click, and the button says what is going on.
document.addEventListener("DOMContentLoaded", function () {
  var form = document.querySelector("form.mail-compose-form");
  if (!form) return;
  var button = form.querySelector("button[type=submit]");
  var label = button ? button.textContent : "";
  // Coming back to this page (the Back button) makes the form usable again.
  window.addEventListener("pageshow", function () {
    delete form.dataset.sending;
    if (button) {
      button.textContent = label;
      button.removeAttribute("aria-disabled");
      button.classList.remove("mail-sending");
    }
  });
  form.addEventListener("submit", function (ev) {
    if (form.dataset.sending) { ev.preventDefault(); return; }
    form.dataset.sending = "1";
    if (button) {
      button.textContent = "Sending…";
      button.setAttribute("aria-disabled", "true");
      button.classList.add("mail-sending");
    }
  });
});
