/* The index of runs served by `devinterp dashboard ROOT --serve`. */
(function () {
  "use strict";

  // @helpers (helpers.js, inserted when the package loads)
  var status = window.__dashboard = {ready: false, polls: 0};
  var config = JSON.parse(document.getElementById("dashboard-config").textContent);
  var runs = JSON.parse(document.getElementById("dashboard-data").textContent);
  var selected = {};

  function encodePath(ref) { return ref.split("/").map(encodeURIComponent).join("/"); }

  function updateCompare() {
    var refs = Object.keys(selected).filter(function (k) { return selected[k]; });
    byId("compare").disabled = refs.length < 2;
    byId("count").textContent = refs.length ? refs.length + " selected" : "";
    return refs;
  }

  function render() {
    byId("root").textContent = config.root;
    var box = byId("run-table");
    while (box.firstChild) box.removeChild(box.firstChild);
    if (!runs.length) {
      box.appendChild(el("p", "empty", "No runs yet: waiting for a folder with an llc.csv."));
      return;
    }
    var table = el("table"), head = el("tr");
    ["", "run", "folder", "λ̂ points", "last step", "stages", "flagged", "updated"].forEach(
      function (c) { head.appendChild(el("th", "", c)); });
    var thead = el("thead");
    thead.appendChild(head);
    table.appendChild(thead);
    var body = el("tbody");
    runs.forEach(function (run) {
      var tr = el("tr"), pick = el("input"), cell = el("td"), link = el("a", "", run.name);
      if (run.error) {
        // A run that cannot be read: its error in its own row; the other runs stay usable.
        tr.className = "error";
        tr.appendChild(el("td"));
        tr.appendChild(el("td", "", run.name));
        tr.appendChild(el("td", "path", run.ref));
        var msg = el("td", "flagged", run.error);
        msg.colSpan = 5;
        tr.appendChild(msg);
        body.appendChild(tr);
        return;
      }
      pick.type = "checkbox";
      pick.checked = !!selected[run.ref];
      pick.addEventListener("change", function () {
        selected[run.ref] = pick.checked;
        updateCompare();
      });
      cell.appendChild(pick);
      tr.appendChild(cell);
      link.href = "/run/" + encodePath(run.ref);
      var name = el("td");
      name.appendChild(link);
      tr.appendChild(name);
      tr.appendChild(el("td", "path", run.ref));
      tr.appendChild(el("td", "", run.points));
      tr.appendChild(el("td", "", run.last_step === null ? "—" : run.last_step));
      tr.appendChild(el("td", "", run.stages));
      tr.appendChild(el("td", run.flagged ? "flagged" : "", run.flagged));
      tr.appendChild(el("td", "muted", run.modified));
      body.appendChild(tr);
    });
    table.appendChild(body);
    box.appendChild(table);
    updateCompare();
  }

  function poll() {
    status.polls += 1;
    fetch(config.runs_url, {cache: "no-store"}).then(function (r) {
      if (!r.ok) throw new Error("HTTP " + r.status);
      return r.json();
    }).then(function (next) {
      var badge = byId("live");
      badge.hidden = false;
      badge.className = "live ok";
      badge.textContent = "live · checked " + new Date().toLocaleTimeString();
      if (JSON.stringify(next) !== JSON.stringify(runs)) { runs = next; render(); }
    }).catch(function (err) {
      var badge = byId("live");
      badge.hidden = false;
      badge.className = "live bad";
      badge.textContent = "live · " + err.message + " · retrying";
    }).then(function () { setTimeout(poll, config.poll_ms); });
  }

  byId("compare").addEventListener("click", function () {
    var refs = updateCompare();
    window.location.href = "/compare?" + refs.map(function (r) {
      return "run=" + encodeURIComponent(r);
    }).join("&");
  });
  render();
  status.ready = true;
  setTimeout(poll, config.poll_ms);
})();
