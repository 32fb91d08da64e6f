/* The dashboard page: lays out the page model (figures are drawn as built in Python). */
(function () {
  "use strict";

  // @helpers (helpers.js, inserted when the package loads)
  // Times in ms since navigation start: script start (plotly.js parsed), main figure drawn,
  // everything drawn.
  var status = window.__dashboard = {ready: false, scriptAt: performance.now(), mainAt: null,
                                     drawnAt: null, renders: 0, polls: 0, error: null};
  var config = JSON.parse(document.getElementById("dashboard-config").textContent);
  var page = JSON.parse(document.getElementById("dashboard-data").textContent);
  var PLOT_CONFIG = {displaylogo: false, responsive: true,
    modeBarButtonsToRemove: ["select2d", "lasso2d", "autoScale2d"],
    toImageButtonOptions: {format: "png", scale: 2, filename: "devinterp-dashboard"}};
  var CHAIN_COLORS = ["#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2",
                      "#ff9da6", "#9d755d", "#bab0ac", "#eeca3b"];
  var traceState = {run: 0, step: null};
  var traceCache = {};
  var traceRequest = 0;
  var llcTableStale = true;
  var influenceState = {step: null, query: null};
  var susceptibilityStep = null;

  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }
  function fmt(x) { return x === null || x === undefined ? "—" : Number(x).toPrecision(4); }
  function plural(n, word) { return n + " " + word + (n === 1 ? "" : "s"); }

  function makeTable(columns, rows, opts) {
    opts = opts || {};
    var table = el("table");
    var head = el("tr");
    columns.forEach(function (c, k) {
      var th = el("th", "", c);
      if (opts.hints && opts.hints[k]) th.title = opts.hints[k];
      head.appendChild(th);
    });
    var thead = el("thead");
    thead.appendChild(head);
    table.appendChild(thead);
    var body = el("tbody");
    rows.forEach(function (row, r) {
      var tr = el("tr", opts.rowClass ? opts.rowClass(r) : "");
      row.forEach(function (cell, k) {
        tr.appendChild(el("td", opts.cellClass ? opts.cellClass(r, k, cell) : "", cell));
      });
      if (opts.extra) tr.appendChild(opts.extra(r));
      body.appendChild(tr);
    });
    table.appendChild(body);
    return table;
  }
  function empty(text) { return el("p", "empty", text); }

  function renderHeader() {
    byId("title").textContent = page.title;
    document.title = page.title + " · devinterp dashboard";
    var list = byId("runs");
    clear(list);
    page.runs.forEach(function (run) {
      var li = el("li");
      if (page.runs.length > 1) {
        var swatch = el("span", "swatch");
        swatch.style.background = run.color;
        li.appendChild(swatch);
        li.appendChild(el("span", "run-name", run.name));
      }
      var facts = plural(run.points, "λ̂ point") +
        (run.last_step !== null ? ", last at step " + run.last_step : "") +
        ", " + plural(run.stages, "stage");
      li.appendChild(el("span", "muted", facts));
      li.appendChild(el("code", "path", run.path));
      list.appendChild(li);
    });
    byId("footer").textContent = "devinterp dashboard · generated " + page.generated +
      (config.live ? " · served live" : " · self-contained file, no network needed");
  }

  function renderBanner() {
    var box = byId("banner");
    clear(box);
    var summary = page.diagnostics.summary;
    var anyRows = page.runs.some(function (r) { return r.points > 0; });
    if (!summary.length) {
      box.className = "banner ok";
      box.textContent = anyRows ?
        "Sampler diagnostics look healthy: no estimate was flagged." :
        "No λ̂ estimates yet.";
      return;
    }
    box.className = "banner bad";
    box.appendChild(el("strong", "", "Sampler diagnostics need attention"));
    var ul = el("ul");
    var multi = page.runs.length > 1;
    summary.forEach(function (s) {
      var li = el("li");
      li.appendChild(el("b", "", s.what));
      var where = s.runs.slice(0, 3).map(function (r) {
        return (multi ? r.name + ": " : "") + "step" + (r.count > 1 ? "s " : " ") +
          r.steps.join(", ") + (r.count > r.steps.length ? ", …" : "");
      }).join("; ") + (s.runs.length > 3 ? "; …" : "");
      li.appendChild(document.createTextNode(
        " at " + plural(s.count, "checkpoint") +
        (multi ? " in " + plural(s.runs.length, "run") : "") + " (" + where + "): " + s.why));
      ul.appendChild(li);
    });
    box.appendChild(ul);
    var link = el("a", "", "See the diagnostics");
    link.href = "#diagnostics";
    box.appendChild(link);
  }

  function renderNotes() {
    var box = byId("notes");
    clear(box);
    page.notes.forEach(function (n) { box.appendChild(el("div", "note", n)); });
  }

  function renderStages() {
    var box = byId("stage-table");
    clear(box);
    var t = page.stages;
    if (!t.rows.length) {
      box.appendChild(empty("No stages detected yet: run `devinterp stages RUN_DIR`."));
      return;
    }
    box.className = t.rows.length > 12 ? "scroll" : "";
    box.appendChild(makeTable(t.columns, t.rows, {cellClass: function (r, k, cell) {
      return k === t.type_column && (cell === "A" || cell === "B") ? "stage-" + cell : "";
    }}));
  }

  function renderFlags() {
    var box = byId("flag-table");
    clear(box);
    var d = page.diagnostics;
    if (!d.flags.length) {
      box.appendChild(empty(page.runs.some(function (r) { return r.points > 0; }) ?
        "No flagged estimates." : "No λ̂ estimates yet."));
      return;
    }
    var multi = page.runs.length > 1;
    box.className = d.flags.length > 12 ? "scroll" : "";
    var columns = (multi ? ["run"] : []).concat(["step", "problem", "value", "why", ""]);
    var rows = d.flags.map(function (f) {
      return (multi ? [page.runs[f.run].name] : []).concat(
        [String(f.step), f.what, f.value, f.why]);
    });
    var hasTrace = page.runs.map(function (run) {
      var steps = {};
      run.trace_steps.forEach(function (s) { steps[s] = true; });
      return steps;
    });
    box.appendChild(makeTable(columns, rows, {
      cellClass: function (r, k) { return k === (multi ? 3 : 2) ? "flagged" : ""; },
      extra: function (r) {
        var f = d.flags[r], td = el("td");
        if (hasTrace[f.run][f.step] === true) {
          var b = el("button", "", "chains");
          b.type = "button";
          b.addEventListener("click", function () { selectTrace(f.run, f.step, true); });
          td.appendChild(b);
        }
        return td;
      }}));
    if (d.more_flags) box.appendChild(el("p", "muted", "… and " + d.more_flags + " more"));
  }

  function renderLlcTable() {
    var box = byId("llc-table");
    clear(box);
    var t = page.diagnostics.table;
    if (!t.rows.length) { box.appendChild(empty("llc.csv has no rows yet.")); return; }
    var flagged = {};
    t.flagged.forEach(function (rc) { flagged[rc[0] + ":" + rc[1]] = true; });
    box.appendChild(makeTable(t.columns, t.rows, {hints: t.hints,
      cellClass: function (r, k) { return flagged[r + ":" + k] ? "flagged" : ""; }}));
    llcTableStale = false;
  }

  function renderKeyValues(boxId, t, what) {
    var box = byId(boxId);
    clear(box);
    if (!t.rows.length) { box.appendChild(empty("No " + what + " recorded.")); return; }
    var single = t.columns.length === 2;
    var columns = single ? ["setting", "value"] : t.columns;
    box.appendChild(makeTable(columns, t.rows, {rowClass: function (r) {
      return !single && t.differs[r] ? "differs" : "";
    }}));
  }

  function loadTrace(run, step) {
    var embedded = page.traces[run.ref];
    if (embedded && embedded[String(step)]) return Promise.resolve(embedded[String(step)]);
    if (!config.trace_url) return Promise.resolve(null);
    var key = run.ref + "@" + step + "@" + page.signature;
    if (traceCache[key]) return Promise.resolve(traceCache[key]);
    var url = config.trace_url + "?run=" + encodeURIComponent(run.ref) + "&step=" + step;
    return fetch(url, {cache: "no-store"}).then(function (r) {
      return r.ok ? r.json() : null;
    }).then(function (payload) { if (payload) traceCache[key] = payload; return payload; });
  }

  function traceFigure(payload) {
    var data = payload.chains.map(function (ys, c) {
      return {type: "scatter", mode: "lines", y: ys,
        x: ys.map(function (_, i) { return i * payload.stride; }),
        name: "chain " + c, line: {width: 1, color: CHAIN_COLORS[c % CHAIN_COLORS.length]},
        hovertemplate: "draw %{x}<br>loss %{y:.5g}<extra>chain " + c + "</extra>",
        meta: {kind: "chain", chain: c}};
    });
    if (payload.baseline !== null) {
      data.push({type: "scatter", mode: "lines", x: [0, Math.max(payload.draws - 1, 1)],
        y: [payload.baseline, payload.baseline], name: "L(w*) baseline",
        line: {color: "#000", width: 1.5, dash: "dash"}, hoverinfo: "y",
        meta: {kind: "baseline"}});
    }
    return {data: data, layout: {
      height: 340, margin: {l: 72, r: 24, t: 30, b: 48}, uirevision: "trace",
      font: {family: "system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif", size: 12},
      plot_bgcolor: "white", paper_bgcolor: "white",
      legend: {orientation: "h", x: 0, y: 1.0, yanchor: "bottom"},
      xaxis: {title: {text: "SGLD draw"}, gridcolor: "#e6e6e6", zeroline: false},
      yaxis: {title: {text: "minibatch loss"}, gridcolor: "#e6e6e6"}}};
  }

  function showTrace() {
    var run = page.runs[traceState.run];
    var caption = byId("trace-caption"), fig = byId("fig-trace");
    var step = traceState.step;
    var request = ++traceRequest;
    if (step === null) {
      caption.textContent = "No loss traces saved for this run.";
      Plotly.purge(fig);
      return Promise.resolve();
    }
    return loadTrace(run, step).then(function (payload) {
      if (request !== traceRequest) return null;
      if (!payload) {
        caption.textContent = "No loss trace saved for step " + step + ".";
        Plotly.purge(fig);
        return null;
      }
      caption.textContent = "λ̂ = " + fmt(payload.llc) +
        (payload.llc_std !== null ? " ± " + fmt(payload.llc_std) : "") + " · " +
        plural(payload.chains.length, "chain") + " × " + payload.draws + " draws" +
        (payload.stride > 1 ? " (every " + payload.stride + "th draw drawn)" : "");
      var f = traceFigure(payload);
      return Plotly.react(fig, f.data, f.layout, PLOT_CONFIG);
    });
  }

  function renderTraceControls() {
    var runSelect = byId("trace-run"), stepSelect = byId("trace-step");
    byId("trace-run-label").hidden = page.runs.length < 2;
    clear(runSelect);
    page.runs.forEach(function (run, i) {
      var o = el("option", "", run.name);
      o.value = String(i);
      runSelect.appendChild(o);
    });
    if (traceState.run >= page.runs.length) traceState.run = 0;
    runSelect.value = String(traceState.run);
    var run = page.runs[traceState.run];
    var steps = run.trace_steps;
    if (steps.indexOf(traceState.step) < 0) {
      traceState.step = steps.length ? steps[steps.length - 1] : null;
    }
    clear(stepSelect);
    var flagged = {};
    run.flagged_steps.forEach(function (s) { flagged[s] = true; });
    steps.forEach(function (s) {
      var bad = flagged[s] === true;
      var o = el("option", "", "step " + s + (bad ? "  ⚠ flagged" : ""));
      o.value = String(s);
      stepSelect.appendChild(o);
    });
    stepSelect.disabled = !steps.length;
    if (traceState.step !== null) stepSelect.value = String(traceState.step);
    return showTrace();
  }

  function selectTrace(runIndex, step, scroll) {
    var steps = page.runs[runIndex].trace_steps;
    if (!steps.length) return;
    var best = steps[0];
    steps.forEach(function (s) { if (Math.abs(s - step) < Math.abs(best - step)) best = s; });
    traceState = {run: runIndex, step: best};
    renderTraceControls();
    if (scroll) byId("traces").scrollIntoView({behavior: "smooth", block: "start"});
  }

  function onPlotClick(ev) {
    var p = ev.points && ev.points[0];
    if (!p || !p.data.meta) return;
    var kind = p.data.meta.kind;
    if (kind === "flag" || kind === "diagnostic-flag") {
      selectTrace(p.customdata[0], p.customdata[1], true);
    } else if (kind === "llc" || kind === "loss" || kind === "diagnostic") {
      selectTrace(p.data.meta.run, p.customdata, true);
    }
  }

  // A select's options; keeps `current` when it is still offered, else the last option.
  function fillSelect(select, values, label, current) {
    clear(select);
    values.forEach(function (v) {
      var o = el("option", "", label(v));
      o.value = String(v);
      select.appendChild(o);
    });
    select.disabled = !values.length;
    var pick = values.indexOf(current) >= 0 ? current :
      (values.length ? values[values.length - 1] : null);
    if (pick !== null) select.value = String(pick);
    return pick;
  }

  function thumb(src, caption) {
    var box = el("figure", "thumb");
    var img = el("img");
    img.src = src;
    img.alt = caption;
    box.appendChild(img);
    box.appendChild(el("figcaption", "", caption));
    return box;
  }

  function renderInfluence() {
    var inf = page.influence;
    byId("influence").hidden = !inf;
    if (!inf) return;
    var caption = byId("influence-caption");
    var queries = inf.queries.map(function (q) { return q.index; });
    influenceState.step = fillSelect(byId("influence-step"), inf.steps,
      function (s) { return "step " + s; }, influenceState.step);
    influenceState.query = fillSelect(byId("influence-query"), queries,
      function (q) { return "probe " + q; },
      influenceState.query === null ? queries[0] : influenceState.query);
    var tableBox = byId("influence-table"), grid = byId("influence-grid");
    var queryBox = byId("influence-query-image");
    clear(tableBox); clear(grid); clear(queryBox);
    var failed = inf.failed.map(function (f) { return "step " + f.step + ": " + f.reason; });
    caption.textContent = inf.run + " · " + inf.kind +
      (inf.more_queries ? " · first " + queries.length + " probes shown" : "") +
      (failed.length ? " · no influence at " + failed.join("; ") : "");
    if (influenceState.step === null || influenceState.query === null) {
      tableBox.appendChild(empty("No checkpoint has probe influence yet."));
      return;
    }
    var rows = inf.top[String(influenceState.step)][String(influenceState.query)] || [];
    tableBox.appendChild(makeTable(["rank", "training sample", "influence", "± se"],
      rows.map(function (r) { return [String(r[0]), String(r[1]), fmt(r[2]), fmt(r[3])]; })));
    var query = inf.queries[queries.indexOf(influenceState.query)];
    if (query && query.image) queryBox.appendChild(thumb(query.image, "probe " + query.index));
    rows.forEach(function (r) {
      var src = inf.train_images[String(r[1])];
      if (src) grid.appendChild(thumb(src, "#" + r[0] + " · sample " + r[1]));
    });
  }

  function renderSusceptibilities() {
    var sus = page.susceptibilities;
    byId("susceptibilities").hidden = !sus;
    if (!sus) return;
    susceptibilityStep = fillSelect(byId("susceptibility-step"), sus.steps,
      function (s) { return "step " + s; }, susceptibilityStep);
    var box = byId("susceptibility-heatmap");
    clear(box);
    var grid = sus.cells[String(susceptibilityStep)];
    var table = makeTable(["component"].concat(sus.probes), sus.components.map(function (c, i) {
      return [c].concat(grid[i].map(function (cell) { return fmt(cell[0]); }));
    }), {cellClass: function (r, k) { return k > 0 ? "cell" : ""; }});
    table.className = "heatmap";
    var trs = table.tBodies[0].rows;
    sus.components.forEach(function (c, i) {
      grid[i].forEach(function (cell, j) {
        var td = trs[i].cells[j + 1];
        td.style.backgroundColor = cell[2];
        td.title = c + " × " + sus.probes[j] + ": " + fmt(cell[0]) + " ± " + fmt(cell[1]);
      });
    });
    box.appendChild(table);
  }

  function listenForClicks(id) {
    var gd = byId(id);
    if (gd.on && !gd.__dashboardClicks) {
      gd.on("plotly_click", onPlotClick);
      gd.__dashboardClicks = true;
    }
  }

  function nextFrame() {
    return new Promise(function (resolve) {
      requestAnimationFrame(function () { setTimeout(resolve, 0); });
    });
  }

  // The loss/λ̂ figure first and let the browser paint it; then the rest of the page.
  function render() {
    status.renders += 1;
    renderHeader();
    renderBanner();
    renderNotes();
    var diag = page.diagnostics.figure;
    return Plotly.react("fig-main", page.main.data, page.main.layout, PLOT_CONFIG)
      .then(function () {
        if (status.mainAt === null) status.mainAt = performance.now();
        listenForClicks("fig-main");
        return nextFrame();
      }).then(function () {
        renderStages();
        renderFlags();
        renderKeyValues("settings-table", page.settings, "sampler settings (settings.json)");
        renderKeyValues("config-table", page.config, "run configuration (run.json)");
        if (byId("llc-details").open) renderLlcTable(); else llcTableStale = true;
        renderInfluence();
        renderSusceptibilities();
        var jobs = [renderTraceControls()];
        var comps = page.components;
        byId("components").hidden = !comps;
        if (comps) {
          jobs.push(Plotly.react("fig-components", comps.data, comps.layout, PLOT_CONFIG));
        } else {
          Plotly.purge("fig-components");
        }
        if (diag) {
          jobs.push(Plotly.react("fig-diag", diag.data, diag.layout, PLOT_CONFIG));
        } else {
          Plotly.purge("fig-diag");
        }
        return Promise.all(jobs);
      }).then(function () { if (diag) listenForClicks("fig-diag"); });
  }

  function setLive(text, ok) {
    var badge = byId("live");
    badge.hidden = false;
    badge.className = "live " + (ok ? "ok" : "bad");
    badge.textContent = text;
  }

  function poll() {
    status.polls += 1;
    var url = config.page_url + "&known=" + encodeURIComponent(page.signature || "");
    fetch(url, {cache: "no-store"}).then(function (r) {
      return r.json().then(function (body) {
        if (!r.ok) throw new Error(body.error || "HTTP " + r.status);
        return body;
      });
    }).then(function (next) {
      setLive("live · checked " + new Date().toLocaleTimeString(), true);
      if (!next.unchanged && next.signature !== page.signature) { page = next; return render(); }
      return null;
    }).catch(function (err) {
      setLive("live · " + err.message + " · retrying", false);
    }).then(function () { setTimeout(poll, config.poll_ms); });
  }

  if (config.index_url) {
    byId("index-link").href = config.index_url;
    byId("index-link").hidden = false;
  }
  byId("trace-run").addEventListener("change", function (ev) {
    traceState = {run: Number(ev.target.value), step: null};
    renderTraceControls();
  });
  byId("trace-step").addEventListener("change", function (ev) {
    traceState.step = Number(ev.target.value);
    showTrace();
  });
  byId("influence-step").addEventListener("change", function (ev) {
    influenceState.step = Number(ev.target.value);
    renderInfluence();
  });
  byId("influence-query").addEventListener("change", function (ev) {
    influenceState.query = Number(ev.target.value);
    renderInfluence();
  });
  byId("susceptibility-step").addEventListener("change", function (ev) {
    susceptibilityStep = Number(ev.target.value);
    renderSusceptibilities();
  });
  byId("llc-details").addEventListener("toggle", function () {
    if (byId("llc-details").open && llcTableStale) renderLlcTable();
  });

  render().then(function () {
    status.drawnAt = performance.now();
    status.ready = true;
    if (config.live) {
      setLive("live · checking every " + config.poll_ms / 1000 + " s", true);
      setTimeout(poll, config.poll_ms);
    }
  }).catch(function (err) {
    status.error = String(err);
    console.error(err);
  });
})();
