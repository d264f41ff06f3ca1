// slimgraph dump: render the trace embedded in #trace-data.
// Only the selected pass's two graphs are in the DOM; one delegated click listener serves every row.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("trace-data").textContent);
  var table = data.nodes;          // interned node records, shared by consecutive graphs
  var graphs = data.graphs;        // graphs[0] captured; graphs[i + 1] after pass i (indices into table)
  var passes = data.passes;
  var state = { pass: 0, query: "", changesOnly: false, node: null };
  var $ = function (id) { return document.getElementById(id); };

  function el(tag, className, text) {
    var e = document.createElement(tag);
    if (className) e.className = className;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  // ---- formatting -------------------------------------------------------
  function human(value, unit) {
    if (typeof value !== "number") return String(value);
    var steps = unit === "B" ? ["B", "KB", "MB", "GB", "TB"] : ["", "K", "M", "G", "T"];
    var i = 0, v = value;
    while (Math.abs(v) >= 1000 && i < steps.length - 1) { v /= 1000; i += 1; }
    return (i === 0 ? String(v) : v.toFixed(v >= 100 ? 0 : v >= 10 ? 1 : 2)) + (unit === "B" ? " " + steps[i] : steps[i]);
  }
  function seconds(s) { return s >= 1 ? s.toFixed(2) + " s" : (s * 1000).toFixed(1) + " ms"; }
  function shape(node) { return node.shape ? "[" + node.shape.join(", ") + "]" : ""; }

  // ---- per-pass derived data -------------------------------------------
  function graphIds(side) {
    if (!passes.length) return side === "before" ? graphs[0] : [];
    return graphs[side === "before" ? state.pass : state.pass + 1];
  }
  function marks(side) {
    var p = passes[state.pass], m = Object.create(null);
    if (!p) return m;
    var add = function (name, cls) { m[name] = m[name] ? m[name] + " " + cls : cls; };
    if (side === "before") {
      p.removed.forEach(function (n) { add(n, "removed"); });
      p.replaced.forEach(function (r) { add(r.old, "replaced"); });
    } else {
      p.added.forEach(function (n) { add(n, "added"); });
      p.replaced.forEach(function (r) { add(r.new, "replaced"); });
    }
    return m;
  }
  function matches(node, q) {
    return !q || node.name.toLowerCase().indexOf(q) >= 0 || node.module_path.toLowerCase().indexOf(q) >= 0;
  }

  // ---- header & timeline -----------------------------------------------
  function renderHeader() {
    var h = data.header, c = h.capture || {};
    var parts = [h.model, "pipeline: " + (h.pipeline || "(empty)"), "entry: " + h.entry];
    if (c.strategy) parts.push("capture: " + c.strategy + (c.seconds !== undefined ? " in " + seconds(c.seconds) : ""));
    if (h.graph_index) parts.push("graph " + h.graph_index);
    $("meta").textContent = parts.join("  ·  ");
    document.title = "slimgraph dump: " + h.model + " (" + (h.pipeline || "") + ")";
  }

  function renderTimeline() {
    var list = $("timeline"), frag = document.createDocumentFragment();
    passes.forEach(function (p, i) {
      var li = el("li", "pass status-" + p.status.replace(/ /g, "-"));
      li.dataset.pass = i;
      var title = el("div", "title");
      title.appendChild(el("span", "name", i + ". " + (p.text || p.name)));
      title.appendChild(el("span", "status", p.status + " · " + seconds(p.seconds)));
      li.appendChild(title);
      if (p.reason) li.appendChild(el("div", "reason", p.reason));
      if (p.notes && p.notes.length) {
        var ul = el("ul", "notes");
        p.notes.forEach(function (n) { ul.appendChild(el("li", "", n)); });
        li.appendChild(ul);
      }
      li.title = "options: " + JSON.stringify(p.options);
      frag.appendChild(li);
    });
    if (!passes.length) frag.appendChild(el("li", "empty", "The pipeline ran no passes."));
    list.appendChild(frag);
  }

  // ---- module hierarchy -------------------------------------------------
  // Built once from every graph's module paths; the counts are refreshed per pass.
  function renderTree() {
    var root = { children: Object.create(null), type: "" };
    graphs.forEach(function (ids) {
      ids.forEach(function (id) {
        var node = table[id], types = Object.create(null);
        node.module_stack.forEach(function (entry) { types[entry[0]] = entry[1]; });
        var parts = node.module_path ? node.module_path.split(".") : [], cur = root, path = "";
        parts.forEach(function (part) {
          path = path ? path + "." + part : part;
          if (!cur.children[part]) cur.children[part] = { children: Object.create(null), path: path, type: "" };
          cur = cur.children[part];
          if (types[path]) cur.type = types[path];
        });
      });
    });
    var frag = document.createDocumentFragment();
    var top = el("div", "leaf");
    top.appendChild(el("span", "mod", "(whole model)")).dataset.module = "";
    top.appendChild(document.createTextNode(" "));
    top.appendChild(el("span", "count")).dataset.countFor = "";
    frag.appendChild(top);
    Object.keys(root.children).forEach(function (k) { frag.appendChild(treeItem(k, root.children[k], 0)); });
    $("tree").appendChild(frag);
  }
  function treeItem(label, item, depth) {
    var keys = Object.keys(item.children);
    var line = el(keys.length ? "summary" : "div", keys.length ? "" : "leaf");
    line.appendChild(el("span", "mod", label)).dataset.module = item.path;
    if (item.type) line.appendChild(el("span", "type", " " + shortType(item.type))).title = item.type;
    line.appendChild(document.createTextNode(" "));
    line.appendChild(el("span", "count")).dataset.countFor = item.path;
    if (!keys.length) return line;
    var details = el("details");
    details.open = depth < 1;
    details.appendChild(line);
    keys.forEach(function (k) { details.appendChild(treeItem(k, item.children[k], depth + 1)); });
    return details;
  }
  function moduleCounts(ids) {
    var counts = Object.create(null);
    ids.forEach(function (id) {
      var path = table[id].module_path, parts = path ? path.split(".") : [], prefix = "";
      counts[""] = (counts[""] || 0) + 1;
      parts.forEach(function (part) {
        prefix = prefix ? prefix + "." + part : part;
        counts[prefix] = (counts[prefix] || 0) + 1;
      });
    });
    return counts;
  }
  function updateTreeCounts() {
    var before = moduleCounts(graphIds("before")), after = moduleCounts(graphIds("after"));
    var spans = $("tree").querySelectorAll("[data-count-for]");
    for (var i = 0; i < spans.length; i++) {
      var path = spans[i].dataset.countFor, b = before[path] || 0, a = passes.length ? after[path] || 0 : b;
      spans[i].textContent = a === b ? "(" + b + ")" : "(" + b + " → " + a + ")";
      spans[i].className = a === b ? "count" : "count changed";
    }
  }

  // ---- selected pass ----------------------------------------------------
  function selectPass(index) {
    state.pass = index;
    var items = $("timeline").querySelectorAll("li.pass");
    for (var i = 0; i < items.length; i++) items[i].classList.toggle("selected", i === index);
    renderTotals();
    updateTreeCounts();
    renderGraphs();
  }

  function renderTotals() {
    var box = $("totals"), p = passes[state.pass];
    box.textContent = "";
    if (!p) return;
    var card = function (label, before, after, unit) {
      var c = el("div", "card");
      c.appendChild(el("div", "label", label));
      var v = el("div", "value", human(before, unit) + " → " + human(after, unit));
      if (typeof before === "number" && typeof after === "number" && before !== after) {
        var pct = before ? ((after - before) / before) * 100 : 0;
        v.appendChild(el("span", after < before ? "delta-down" : "delta-up",
          " (" + (pct > 0 ? "+" : "") + pct.toFixed(pct > -1 && pct < 1 ? 2 : 1) + "%)"));
      }
      c.appendChild(v);
      return c;
    };
    var tb = p.totals_before, ta = p.totals_after;
    box.appendChild(card("nodes", tb.nodes, ta.nodes));
    box.appendChild(card("param bytes", tb.param_bytes, ta.param_bytes, "B"));
    box.appendChild(card("FLOPs", tb.flops, ta.flops));
    var info = el("div", "card");
    info.appendChild(el("div", "label", (p.text || p.name) + ": " + p.status));
    info.appendChild(el("div", "value", seconds(p.seconds) + " (+ verify " + seconds(p.verify_seconds || 0) +
      ") · output error " + errorText(p.output_error) +
      " · +" + p.added.length + " −" + p.removed.length + " ~" + p.replaced.length));
    box.appendChild(info);
  }

  function errorText(e) {
    if (e === null || e === undefined) return "n/a";
    return e === 0 ? "0" : Number(e).toExponential(1);
  }

  function renderGraphs() {
    renderColumn($("before"), "before");
    renderColumn($("after"), "after");
  }

  function renderColumn(container, side) {
    var ids = graphIds(side), mark = marks(side), q = state.query.toLowerCase();
    var groups = new Map();
    ids.forEach(function (id) {
      var node = table[id];
      if (!matches(node, q) || (state.changesOnly && !mark[node.name])) return;
      var path = node.module_path;
      if (!groups.has(path)) groups.set(path, []);
      groups.get(path).push(node);
    });
    var frag = document.createDocumentFragment(), shown = 0;
    groups.forEach(function (nodes, path) {
      var group = el("details", "group");
      group.open = true;
      group.style.containIntrinsicSize = "auto " + (20 + 18 * nodes.length) + "px";  // its height unrendered
      var summary = el("summary", "", (path || "(top level)") + " ");
      var type = moduleType(nodes[0]);
      if (type) summary.appendChild(el("span", "type", shortType(type) + " "));
      summary.appendChild(el("span", "type", "· " + nodes.length));
      group.appendChild(summary);
      nodes.forEach(function (node) {
        var cls = mark[node.name];
        if (cls) group.className = "group has-changes";
        var row = el("div", cls ? "node " + cls : "node");
        row.dataset.node = node.name;
        row.dataset.side = side;
        if (state.node && state.node.side === side && state.node.name === node.name) row.classList.add("selected");
        row.appendChild(el("span", "n", node.name));
        row.appendChild(el("span", "k", node.kernel));
        row.appendChild(el("span", "s", shape(node)));
        group.appendChild(row);
        shown += 1;
      });
      frag.appendChild(group);
    });
    if (!shown) frag.appendChild(el("div", "empty", ids.length ? "No node matches the filter." : "No graph."));
    var body = container.querySelector(".body");
    body.textContent = "";
    body.appendChild(frag);
    container.querySelector(".count").textContent = shown === ids.length ? ids.length + " nodes" : shown + " of " + ids.length + " nodes";
  }
  function shortType(type) { return type.slice(type.lastIndexOf(".") + 1); }
  function moduleType(node) {
    var stack = node.module_stack;
    for (var i = stack.length - 1; i >= 0; i--) if (stack[i][0] === node.module_path) return stack[i][1];
    return "";
  }

  // ---- node panel -------------------------------------------------------
  function findNode(side, name) {
    var ids = graphIds(side);
    for (var i = 0; i < ids.length; i++) if (table[ids[i]].name === name) return table[ids[i]];
    return null;
  }
  function showNode(side, name) {
    var node = findNode(side, name), panel = $("node-panel");
    if (!node) return;
    state.node = { side: side, name: name };
    var old = document.querySelectorAll(".node.selected");
    for (var i = 0; i < old.length; i++) old[i].classList.remove("selected");
    var row = document.querySelector('.node[data-side="' + side + '"][data-node="' + CSS.escape(name) + '"]');
    if (row) row.classList.add("selected");
    panel.textContent = "";
    panel.appendChild(el("h2", "", side === "before" ? "node (before the pass)" : "node (after the pass)"));
    var t = el("table");
    var add = function (label, value) {
      var tr = el("tr");
      tr.appendChild(el("th", "", label));
      var td = el("td");
      if (value instanceof Node) td.appendChild(value); else td.textContent = value === null || value === undefined || value === "" ? "—" : String(value);
      tr.appendChild(td);
      t.appendChild(tr);
    };
    add("name", node.name);
    add("op", node.op);
    add("kernel", node.kernel);
    add("target", node.target);
    add("shape", shape(node));
    add("dtype", node.dtype);
    add("FLOPs", typeof node.flops === "number" ? node.flops.toLocaleString() + " (" + human(node.flops) + ")" : node.flops);
    add("bytes", typeof node.bytes === "number" ? node.bytes.toLocaleString() + " (" + human(node.bytes, "B") + ")" : node.bytes);
    add("module", node.module_path || "(top level)");
    add("module stack", node.module_stack.map(function (e) { return e[0] + " (" + e[1] + ")"; }).join(" › "));
    add("provenance", provenance(side, node));
    add("inputs", links(side, node.inputs));
    add("users", links(side, users(side, node.name)));
    var source = el("code", "source", node.source || "(no user source line)");
    source.id = "node-source";
    add("source", source);
    panel.appendChild(t);
  }
  function provenance(side, node) {
    var p = passes[state.pass], parts = [];
    if (node.provenance) parts.push("replaces " + node.provenance);
    if (p) p.replaced.forEach(function (r) {
      if (side === "before" && r.old === node.name) parts.push("replaced by " + r.new);
    });
    if (p && side === "after" && p.added.indexOf(node.name) >= 0) parts.push("added by " + (p.text || p.name));
    if (p && side === "before" && p.removed.indexOf(node.name) >= 0) parts.push("removed by " + (p.text || p.name));
    return parts.join("; ");
  }
  function users(side, name) {
    return graphIds(side).map(function (id) { return table[id]; })
      .filter(function (n) { return n.inputs.indexOf(name) >= 0; })
      .map(function (n) { return n.name; });
  }
  function links(side, names) {
    if (!names.length) return "";
    var span = el("span");
    names.forEach(function (name, i) {
      if (i) span.appendChild(document.createTextNode(", "));
      var a = span.appendChild(el("span", "link", name));
      a.dataset.node = name;
      a.dataset.side = side;
    });
    return span;
  }

  // ---- events (delegated) ----------------------------------------------
  document.addEventListener("click", function (event) {
    var target = event.target;
    var pass = target.closest("[data-pass]");
    if (pass) return selectPass(Number(pass.dataset.pass));
    var mod = target.closest("[data-module]");
    if (mod) {
      event.preventDefault();  // filter by the module; the disclosure triangle still folds
      $("search").value = mod.dataset.module;
      return setQuery(mod.dataset.module);
    }
    var node = target.closest("[data-node]");
    if (node) showNode(node.dataset.side, node.dataset.node);
  });
  var timer = null;
  $("search").addEventListener("input", function (event) {
    clearTimeout(timer);
    timer = setTimeout(function () { setQuery(event.target.value); }, 120);
  });
  $("changes-only").addEventListener("change", function (event) {
    state.changesOnly = event.target.checked;
    renderGraphs();
  });
  function setQuery(q) {
    state.query = q.trim();
    renderGraphs();
  }

  renderHeader();
  renderTimeline();
  renderTree();
  selectPass(0);
  document.body.dataset.ready = "true";
  // Rendered = the first pass view is laid out and painted (the frame after the DOM was built).
  requestAnimationFrame(function () {
    setTimeout(function () {
      window.slimgraphDumpRenderedMs = performance.now();
      document.body.dataset.rendered = "true";
    }, 0);
  });
})();
