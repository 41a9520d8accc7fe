
"use strict";
(function () {
  var data = JSON.parse(document.getElementById("report-data").textContent);
  var cols = data.columns, images = data.images, ref = data.reference || {};
  var state = {sort: "file", dir: 1, cls: "", label: "", text: "", page: 0, size: 100};
  var el = function (id) { return document.getElementById(id); };
  function make(tag, cls, text) {
    var n = document.createElement(tag);
    if (cls) n.className = cls;
    if (text !== undefined) n.textContent = text;
    return n;
  }
  function fmt(v, kind) {
    if (v === null || v === undefined) return "";
    if (kind === "prob") return v.toFixed(3);
    if (kind === "fixed2") return v.toFixed(2);
    if (kind === "fixed3") return v.toFixed(3);
    if (kind === "sci") return v === 0 ? "0" : (Math.abs(v) >= 0.01 && Math.abs(v) < 1000 ? v.toPrecision(3) : v.toExponential(1));
    return Math.abs(v) >= 0.01 && Math.abs(v) < 1e5 ? String(+v.toPrecision(4)) : v.toExponential(2);
  }
  // header
  var head = el("head-row");
  function th(key, label, title, extra, cls) {
    var cell = make("th", cls);
    cell.dataset.key = key;
    var b = make("button", "", label);
    if (title) b.title = title;
    b.type = "button";
    b.addEventListener("click", function () {
      if (state.sort === key) state.dir = -state.dir;
      else { state.sort = key; state.dir = (key === "file" || key === "class" || key === "label") ? 1 : -1; }
      state.page = 0; render();
    });
    cell.appendChild(b);
    if (extra) b.appendChild(make("span", "ref", extra));
    head.appendChild(cell);
  }
  head.appendChild(make("th", "", ""));
  th("file", "Image", "file name (relative to input.dir)");
  var hasLabels = images.some(function (im) { return im.l !== undefined; });
  if (hasLabels) th("label", "Label", "the image's label (targets.from_csv); ✓ when the model's top class is the label");
  th("class", "Explained classes", "the explained classes in the asked order, each with its rank among all outputs (1 = the model's top class); sorts by the first");
  cols.forEach(function (c, i) {
    var extra = ref[c.key] !== undefined ? "random " + fmt(ref[c.key], c.fmt) : "";
    th(String(i), c.label, c.title + (c.better ? " (" + c.better + "er is better)" : "") + "; sorts by the top-1 class", extra, "num");
  });
  function predicted(im) { return im.p !== undefined ? im.p : im.c[0]; }
  // class filter: predicted (top-1) classes with their counts
  var counts = {};
  images.forEach(function (im) { var c = predicted(im); counts[c] = (counts[c] || 0) + 1; });
  var select = el("cls");
  Object.keys(counts).sort(function (a, b) { return counts[b] - counts[a] || (a < b ? -1 : a > b ? 1 : 0); })
    .forEach(function (c) { var o = make("option", "", c + " (" + counts[c] + ")"); o.value = c; select.appendChild(o); });
  select.addEventListener("change", function () { state.cls = select.value; state.label = ""; state.page = 0; render(); });
  var text = el("q");
  text.addEventListener("input", function () { state.text = text.value.trim().toLowerCase(); state.page = 0; render(); });
  var size = el("size");
  size.addEventListener("change", function () { state.size = +size.value; state.page = 0; render(); });
  el("prev").addEventListener("click", function () { state.page--; render(); });
  el("next").addEventListener("click", function () { state.page++; render(); });
  images.forEach(function (im) { im.s = (im.f + "\n" + im.c.join("\n") + "\n" + (im.l || "")).toLowerCase(); });
  // label x predicted class: counts, each cell filters the table to its images
  if (hasLabels) {
    var labels = {}, preds = {}, cell = {};
    images.forEach(function (im) {
      if (im.l === undefined) return;
      labels[im.l] = 1; preds[predicted(im)] = 1;
      var k = im.l + "\u0000" + predicted(im); cell[k] = (cell[k] || 0) + 1;
    });
    var lk = Object.keys(labels).sort(), pk = Object.keys(preds).sort();
    var table = make("table", "grid confusion"), hr = make("tr");
    hr.appendChild(make("th", "", "label \u2193 / top class \u2192"));
    pk.forEach(function (p) { hr.appendChild(make("th", "", p)); });
    table.appendChild(hr);
    lk.forEach(function (l) {
      var tr = make("tr"); tr.appendChild(make("th", "", l));
      pk.forEach(function (p) {
        var td = make("td", l === p ? "agree" : ""), n = cell[l + "\u0000" + p] || 0;
        if (n) {
          var b = make("button", "", String(n)); b.type = "button";
          b.title = "show the " + n + " image(s) labelled " + l + " whose top class is " + p;
          b.addEventListener("click", function () { state.label = l; state.cls = p; select.value = p; state.page = 0; render(); });
          td.appendChild(b);
        } else td.textContent = "0";
        tr.appendChild(td);
      });
      table.appendChild(tr);
    });
    var box = el("confusion");
    box.appendChild(make("h2", "", "Label and top class"));
    box.appendChild(make("p", "muted", "Images per label (rows) and the model's top class (columns); click a count to list those images."));
    box.appendChild(table);
    box.hidden = false;
  }

  function value(im, key) {
    if (key === "file") return im.f;
    if (key === "class") return im.c[0];
    if (key === "label") return im.l === undefined ? null : im.l;
    var v = im.v[+key];
    return v && v.length ? v[0] : null;
  }
  function compare(a, b) {
    var x = value(a, state.sort), y = value(b, state.sort);
    if (x === null || y === null) return x === y ? 0 : (x === null ? 1 : -1);  // blanks last
    var r = typeof x === "string" ? (x < y ? -1 : x > y ? 1 : 0) : x - y;
    return r * state.dir || (a.f < b.f ? -1 : a.f > b.f ? 1 : 0);
  }
  function row(im) {
    var tr = make("tr", im === state.mark ? "marked" : "");
    var t = make("td", "thumb");
    if (im.u) {
      var a = make("a"); a.href = im.u; a.target = "_blank"; a.rel = "noopener";
      a.title = "open the full overlay";
      var img = make("img"); img.loading = "lazy"; img.decoding = "async"; img.alt = "overlay of " + im.f;
      img.addEventListener("error", function () { a.replaceChildren(make("span", "muted", "cannot show the overlay: open it")); });
      img.src = im.u;
      a.appendChild(img); t.appendChild(a);
    } else {
      t.appendChild(make("span", "muted", "no overlay"));
    }
    tr.appendChild(t);
    var f = make("td", "file");
    if (im.u) { var fa = make("a", "", im.f); fa.href = im.u; fa.target = "_blank"; fa.rel = "noopener"; f.appendChild(fa); }
    else f.textContent = im.f;
    tr.appendChild(f);
    if (hasLabels) {
      var lt = make("td", "lbl", im.l === undefined ? "" : im.l);
      if (im.l !== undefined) lt.appendChild(make("span", predicted(im) === im.l ? "ok" : "bad", predicted(im) === im.l ? " \u2713" : " \u2717 " + predicted(im)));
      tr.appendChild(lt);
    }
    var c = make("td", "cls");
    im.c.forEach(function (name, r) {
      var d = make("div"), rank = im.r && im.r[r] !== null && im.r[r] !== undefined ? im.r[r] : r + 1;
      var rk = make("span", "rk", String(rank)); rk.title = "rank " + rank + " among all outputs" + (im.t && im.t[r] ? "; explained as " + im.t[r] : "");
      d.appendChild(rk); d.appendChild(document.createTextNode(name));
      if (im.t && im.t[r] && im.t[r].indexOf("label") >= 0) d.appendChild(make("span", "tag", "label"));
      c.appendChild(d);
    });
    tr.appendChild(c);
    cols.forEach(function (col, i) {
      var td = make("td", "num");
      (im.v[i] || []).forEach(function (v) {
        var low = v !== null && ((col.key === "stability" && v < 0.5) || (col.warn_at != null && v >= col.warn_at));
        td.appendChild(make("div", low ? "low" : "", fmt(v, col.fmt)));
      });
      tr.appendChild(td);
    });
    return tr;
  }
  function visible() {
    var shown = images.filter(function (im) {
      return (!state.cls || predicted(im) === state.cls) && (!state.label || im.l === state.label) &&
        (!state.text || im.s.indexOf(state.text) >= 0);
    });
    return shown.sort(compare);
  }
  function render() {
    var shown = visible();
    var pages = Math.max(1, Math.ceil(shown.length / state.size));
    state.page = Math.min(Math.max(state.page, 0), pages - 1);
    var start = state.page * state.size, slice = shown.slice(start, start + state.size);
    var body = el("rows"), frag = document.createDocumentFragment();
    slice.forEach(function (im) { frag.appendChild(row(im)); });
    body.textContent = "";
    body.appendChild(frag);
    el("empty").hidden = shown.length > 0;
    el("empty").textContent = images.length ? "No image matches the filter." : "No image has been explained yet (topk.csv is empty).";
    Array.prototype.forEach.call(head.children, function (cell) {
      var on = cell.dataset.key === state.sort;
      cell.classList.toggle("sorted", on);
      cell.setAttribute("aria-sort", on ? (state.dir > 0 ? "ascending" : "descending") : "none");
      var b = cell.firstChild;
      if (b && b.firstChild) b.firstChild.textContent = b.firstChild.textContent.replace(/ [\u25b2\u25bc]$/, "") + (on ? (state.dir > 0 ? " \u25b2" : " \u25bc") : "");
    });
    var info = shown.length ? (start + 1).toLocaleString() + "\u2013" + (start + slice.length).toLocaleString() + " of " + shown.length.toLocaleString() : "0";
    if (shown.length !== images.length) info += " (filtered from " + images.length.toLocaleString() + ")";
    el("info").textContent = info + " images";
    el("page").textContent = "page " + (state.page + 1) + " of " + pages;
    el("prev").disabled = state.page === 0;
    el("next").disabled = state.page >= pages - 1;
  }
  render();
  // #image=NAME (the Slides cards' top tiles): clear the filters, turn to that row's page and mark it;
  // #q=TEXT: filter the table by TEXT. A link to the hash already shown acts again on click.
  function follow() {
    var m = /^#(image|q)=(.*)$/.exec(location.hash), value;
    if (!m) return;
    try { value = decodeURIComponent(m[2]); } catch (e) { return; }
    state.cls = ""; state.label = ""; select.value = ""; state.mark = null;
    if (m[1] === "q") {
      text.value = value; state.text = value.trim().toLowerCase(); state.page = 0; render();
      el("browse").scrollIntoView();
      return;
    }
    var target = images.filter(function (im) { return im.f === value; })[0];
    if (!target) return;
    text.value = ""; state.text = ""; state.mark = target;
    state.page = Math.floor(visible().indexOf(target) / state.size);
    render();
    var tr = document.querySelector("#rows tr.marked");
    if (tr) tr.scrollIntoView({block: "center"});
  }
  window.addEventListener("hashchange", follow);
  document.addEventListener("click", function (e) {
    var a = e.target.closest ? e.target.closest("a[href^='#']") : null;
    if (a && a.hash === location.hash) follow();
  });
  follow();
  Array.prototype.forEach.call(document.querySelectorAll("#slides a.map img"), function (img) {
    function broken() { img.parentNode.replaceChildren(make("span", "muted", "cannot show the heatmap: open it")); }
    if (img.complete && img.naturalWidth === 0 && img.currentSrc) broken();
    else img.addEventListener("error", broken);
  });
  document.body.dataset.ready = "1";
})();
