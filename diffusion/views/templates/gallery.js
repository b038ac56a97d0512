// index.html: the run summary and one card per edit, built from the JSON block #run-data (written by
// diffusion/views/gallery.py). Plain DOM, no libraries, no network: the page works when opened from disk.
"use strict";
(function () {
  var data = JSON.parse(document.getElementById("run-data").textContent);
  var ARROW = "\u2192";
  var DASH = "\u2013";
  var EAGER_CARDS = 24;  // the first cards load at once; later ones when scrolled near (large runs stay light)

  // ---- small helpers ------------------------------------------------------------------------------------------
  function num(value, digits) {
    if (value === null || value === undefined || isNaN(value)) return DASH;
    return Number(value).toFixed(digits === undefined ? 3 : digits);
  }
  function signed(value) {
    if (value === null || value === undefined) return DASH;
    return (value >= 0 ? "+" : DASH) + Math.abs(value).toFixed(2);
  }
  function short(value) {
    return value === null || value === undefined ? DASH : String(Number(value));
  }
  function pct(value) {
    return value === null || value === undefined ? DASH : (100 * value).toFixed(0) + "%";
  }
  // "95% CI 12" + DASH + "77%" for a [lo, hi] interval of a rate; "" without one
  function rateCi(ci) {
    return ci ? "95% CI " + (100 * ci[0]).toFixed(0) + DASH + (100 * ci[1]).toFixed(0) + "%" : "";
  }
  function meanCi(ci, digits) {
    return ci ? "95% CI " + num(ci[0], digits) + DASH + num(ci[1], digits) : null;
  }
  function numCi(value, ci, digits) {
    return num(value, digits) + (ci && value !== null && value !== undefined
      ? " [" + num(ci[0], digits) + ", " + num(ci[1], digits) + "]" : "");
  }
  function verdict(flipped) {
    if (flipped === true) return ["flipped", "flipped"];
    if (flipped === false) return ["not-flipped", "not flipped"];
    return ["unjudged", "no oracle"];
  }
  // look: {px: enlarge with crisp pixels, lazy: load when scrolled near, size: [w, h] so the box is right before the
  // image loads}. loading is set before src on purpose: setting src starts the fetch.
  function img(src, alt, look) {
    if (!src) return el("div", {className: "missing", text: "(image missing)"});
    var size = look.size || [null, null];
    return el("img", {loading: look.lazy ? "lazy" : null, decoding: "async", className: look.px ? "px" : null,
                      width: size[0], height: size[1], alt: alt, src: src});
  }

  // ---- summary ------------------------------------------------------------------------------------------------
  function metric(label, value, note) {
    return el("div", {className: "metric"}, el("div", {className: "metric-value", text: value}),
              el("div", {className: "metric-label", text: label}),
              note ? el("div", {className: "metric-note", text: note}) : null);
  }

  function histogram(all, flipped) {
    // numeric order, mildest (largest) t_skip first: JavaScript lists integer-like keys ("0") before the others
    var keys = Object.keys(all || {}).sort(function (a, b) { return Number(b) - Number(a); });
    if (!keys.length) return null;
    var most = Math.max.apply(null, keys.map(function (k) { return all[k]; }));
    var box = el("div", {className: "histogram"}, el("h3", {text: "Chosen t_skip (bar: all edits; dark: flipped)"}));
    keys.forEach(function (k) {
      var n = all[k], f = (flipped || {})[k] || 0;
      box.appendChild(el("div", {className: "hist-row"}, el("span", {className: "hist-key", text: k}),
        el("span", {className: "hist-bar", style: "width:" + (100 * n / most).toFixed(1) + "%"},
           el("span", {className: "hist-flipped", style: "width:" + (100 * f / n).toFixed(1) + "%"})),
        el("span", {className: "hist-n", text: String(n) + (data.has_oracle ? " (" + f + " flipped)" : "")})));
    });
    return box;
  }

  function table(head, rows) {
    var t = el("table", {}, el("thead", {}, el("tr", {}))), body = el("tbody");
    head.forEach(function (h) { t.tHead.rows[0].appendChild(el("th", {text: h})); });
    rows.forEach(function (r) {
      var tr = el("tr");
      r.forEach(function (c) { tr.appendChild(el("td", {text: c})); });
      body.appendChild(tr);
    });
    t.appendChild(body);
    return t;
  }

  function renderSummary() {
    var s = data.summary || {}, box = document.getElementById("summary");
    var attempted = s.n_attempted === undefined ? s.n_rows : s.n_attempted;
    var flipNote = s.flip_rate === null || s.flip_rate === undefined ? "no oracle judged this run"
      : s.n_flipped + " of " + attempted + " attempted edits; " + rateCi(s.flip_rate_ci);
    var judged = s.judge_flip_rate !== null && s.judge_flip_rate !== undefined;
    var grid = el("div", {className: "metrics"},
      metric("images", String(s.n_images)), metric("edits (rows)", String(s.n_rows)),
      metric(judged ? "flip rate (oracle)" : "flip rate", pct(s.flip_rate), flipNote),
      judged ? metric("flip rate (judge)", pct(s.judge_flip_rate),
                      s.n_judge_flipped + " of " + attempted + "; " + rateCi(s.judge_flip_rate_ci)) : null,
      metric("LPIPS (flipped)", num(s.lpips_mean), meanCi(s.lpips_mean_ci, 3)),
      metric("L2 (flipped)", num(s.l2_mean), meanCi(s.l2_mean_ci, 3)),
      metric("L2 (all edits)", num(s.l2_mean_all), meanCi(s.l2_mean_all_ci, 3)),
      metric("mean t_skip", num(s.t_skip_mean, 2), meanCi(s.t_skip_mean_ci, 2)),
      metric("UNet evals / image", num(s.unet_evals_per_image, 0), meanCi(s.unet_evals_per_image_ci, 0)),
      metric("seconds / image", num(s.seconds_per_image, 1)));
    box.appendChild(grid);
    if (s.note) box.appendChild(el("p", {className: "verdict-note", text: s.note}));
    var side = el("div", {className: "summary-detail"});
    var hist = histogram(s.t_skip_histogram, s.t_skip_histogram_flipped);
    if (hist) side.appendChild(hist);
    var dirs = s.per_direction || {};
    if (Object.keys(dirs).length) {
      var head = ["direction", "edits", "flipped", "flip rate [95% CI]"];
      if (judged) head.push("judge flip rate");
      head = head.concat(["LPIPS", "L2 (flipped)", "mean t_skip"]);
      side.appendChild(el("div", {className: "per-direction"}, el("h3", {text: "Per direction"}),
        el("div", {className: "table-wrap"}, table(head, Object.keys(dirs).map(function (k) {
          var d = dirs[k];
          var row = [k.replace("->", " " + ARROW + " "), String(d.n), String(d.n_flipped),
                     pct(d.flip_rate) + (d.flip_rate_ci ? " [" + pct(d.flip_rate_ci[0]) + ", " +
                                         pct(d.flip_rate_ci[1]) + "]" : "")];
          if (judged) row.push(pct(d.judge_flip_rate));
          return row.concat([numCi(d.lpips_mean, d.lpips_mean_ci), numCi(d.l2_mean, d.l2_mean_ci),
                             num(d.t_skip_mean, 2)]);
        })))));
    }
    if (s.intervals) side.appendChild(el("p", {className: "muted intervals-note", text: s.intervals}));
    box.appendChild(side);
    var settings = s.settings || {};
    var chips = el("div", {className: "chips"}, el("h3", {text: "Settings"}));
    function chip(k, v) {
      chips.appendChild(el("span", {className: "chip"}, el("span", {className: "chip-key", text: k}), " " + v));
    }
    Object.keys(settings).forEach(function (k) {
      var v = settings[k];
      chip(k, typeof v === "string" ? v : JSON.stringify(v));
    });
    (s.class_mean_geometry || []).forEach(function (g) {
      chip("class means " + g.a + " / " + g.b, "distance " + num(g.distance) + ", cosine " + num(g.cosine));
    });
    chip("difference maps", "full scale = each image's " + data.diff_percentile + "th percentile of change");
    chip("GIF frame", data.frame_ms + " ms");
    box.appendChild(chips);
  }

  function renderFigures() {
    var box = document.getElementById("figures"), figures = data.figures || [];
    if (!figures.length) {
      box.hidden = true;
      return;
    }
    box.appendChild(el("h2", {text: "Figures"}));
    var grid = el("div", {className: "figure-grid"});
    figures.forEach(function (f) {
      // shown at its own size (the SVG's width), narrower screens shrink it
      grid.appendChild(el("figure", {className: "run-figure", "data-name": f.name,
                                     style: f.width_px ? "width:" + f.width_px + "px" : null},
        el("a", {href: f.svg}, el("img", {src: f.svg, alt: f.caption, decoding: "async"})),
        el("figcaption", {}, f.caption + " ", el("a", {href: f.png, text: "PNG"}), " ",
           el("a", {href: f.svg, text: "SVG"}))));
    });
    box.appendChild(grid);
    box.appendChild(el("p", {className: "muted"}, "Every figure with its interval, one per line: ",
      el("a", {href: "figures/figures.csv", text: "figures.csv"}), " (nested: ",
      el("a", {href: "figures/figures.json", text: "figures.json"}), ")."));
  }

  function renderLinks() {
    var nav = document.getElementById("run-links");
    var names = {"quiz.html": "Lesson & quiz " + ARROW, "results.csv": "results.csv", "summary.json": "summary.json",
                 "config.yaml": "config.yaml"};
    Object.keys(data.links).forEach(function (name) {
      nav.appendChild(el("a", {href: data.links[name], className: name === "quiz.html" ? "button" : null,
                               text: names[name] || name}));
    });
  }

  // ---- cards --------------------------------------------------------------------------------------------------
  function compare(card, look) {
    // Left of the divider: the original; right of it: the counterfactual (clipped by --pos). Slider or pointer.
    var fig = el("figure", {className: "view compare-view"});
    var top = img(card.counterfactual, "counterfactual", look);
    top.classList.add("cf-layer");
    var stack = el("div", {className: "compare", style: "--pos:50%"}, img(card.original, "original", look), top,
      el("div", {className: "divider"}), el("span", {className: "tag tag-left", text: "original"}),
      el("span", {className: "tag tag-right", text: "counterfactual"}));
    var slider = el("input", {type: "range", min: "0", max: "100", value: "50", className: "compare-slider",
                              "aria-label": "Reveal the original (right) or the counterfactual (left)"});
    function set(value) {
      stack.style.setProperty("--pos", value + "%");
      slider.value = String(value);
    }
    slider.addEventListener("input", function () { set(slider.value); });
    stack.addEventListener("pointermove", function (ev) {
      var box = stack.getBoundingClientRect();
      set(Math.round(Math.min(100, Math.max(0, 100 * (ev.clientX - box.left) / box.width))));
    });
    fig.appendChild(stack);
    fig.appendChild(slider);
    fig.appendChild(el("figcaption", {text: "Compare: drag the slider or move the pointer over the image"}));
    return fig;
  }

  function diffView(card, look) {
    var legend = el("div", {className: "legend"},
      el("span", {className: "legend-bar", style: "background:" + data.legend}),
      el("span", {className: "legend-scale"}, el("span", {text: "0"}),
         el("span", {text: card.diff_scale === null ? "" : num(card.diff_scale, 2)})));
    return el("figure", {className: "view"}, img(card.diff, "difference map", look), legend,
              el("figcaption", {text: "Difference map: RMS change per pixel over the dimmed original"}));
  }

  function oracleBlock(card) {
    var box = el("div", {className: "oracle"});
    if (card.p_before === null) {
      box.appendChild(el("p", {className: "muted", text: "No oracle: the target probabilities are unknown."}));
      return box;
    }
    var target = card.target_class;
    function bar(label, p) {
      return el("div", {className: "prob"}, el("span", {className: "prob-label", text: label}),
                el("span", {className: "prob-track"},
                   el("span", {className: "prob-fill", style: "width:" + (100 * p).toFixed(1) + "%"})),
                el("span", {className: "prob-value", text: num(p, 2)}));
    }
    box.appendChild(el("h4", {text: "Oracle: p(" + target + ")"}));
    box.appendChild(bar("original", card.p_before));
    box.appendChild(bar("counterfactual", card.p_after));
    box.appendChild(el("p", {className: "delta", text: "change in confidence " + signed(card.delta) +
      (card.oracle_pred_before ? "; original predicted as " + card.oracle_pred_before : "")}));
    return box;
  }

  // The interpolation strip as HTML: each frame with its label and the oracle's p(target) under it, as text that
  // stays readable at any width (the strip.png beside it has no text).
  function stripView(card, look) {
    var target = card.target_class, frames = el("div", {className: "strip-frames"});
    card.strip_frames.forEach(function (f) {
      var p = f.target_prob, known = p !== null && p !== undefined;
      frames.appendChild(el("figure", {className: "strip-frame"},
        img(f.image, f.caption, {px: card.pixelated, lazy: look.lazy, size: card.size}),
        el("figcaption", {},
           el("span", {className: "frame-label", text: f.caption}),
           el("span", {className: "frame-prob", text: "p(" + target + ") " + (known ? num(p, 2) : "n/a")}),
           known ? el("span", {className: "prob-track"},
                      el("span", {className: "prob-fill", style: "width:" + (100 * p).toFixed(1) + "%"})) : null)));
    });
    return el("figure", {className: "strip"}, frames,
      el("figcaption", {}, "Interpolation strip: the original, then the edit at every eta at t_skip " +
         num(card.strip_t_skip, 2) + " (one inversion); under each frame the oracle's p(" + target + "). ",
         card.strip ? el("a", {href: card.strip, text: "strip.png"}) : null));
  }

  function renderCard(card, index) {
    var look = {px: card.pixelated, lazy: index >= EAGER_CARDS, size: card.size};
    var v = verdict(card.flipped);
    var article = el("article", {className: "card", "data-index": String(index), "data-direction": card.direction,
                                 "data-flipped": v[0], "data-delta": card.delta === null ? "" : String(card.delta)});
    article.appendChild(el("header", {className: "card-head"},
      el("h2", {text: card.direction}), el("span", {className: "badge badge-" + v[0], text: v[1]}),
      el("span", {className: "meta", text: card.source_path}),
      el("span", {className: "meta", text: "eta " + short(card.eta) + ", t_skip " + num(card.t_skip, 2)})));
    var views = el("div", {className: "views"});
    views.appendChild(compare(card, look));
    views.appendChild(el("figure", {className: "view"}, img(card.gif, "flicker GIF", look),
      el("figcaption", {text: "Flicker: original " + ARROW + " counterfactual, " + data.frame_ms + " ms each"})));
    views.appendChild(diffView(card, look));
    var facts = el("div", {className: "facts"}, oracleBlock(card),
      el("dl", {}, el("dt", {text: "chosen t_skip"}), el("dd", {text: num(card.t_skip, 2)}),
         el("dt", {text: "eta"}), el("dd", {text: short(card.eta)}),
         el("dt", {text: "L2 / LPIPS"}), el("dd", {text: num(card.l2) + " / " + num(card.lpips)}),
         el("dt", {text: "attempts"}), el("dd", {text: num(card.attempts, 0)}),
         el("dt", {text: "UNet evals"}), el("dd", {text: num(card.unet_evals, 0)})));
    views.appendChild(facts);
    article.appendChild(views);
    if (card.strip_frames && card.strip_frames.length) {
      article.appendChild(stripView(card, look));
    }
    return article;
  }

  // ---- filter and sort ----------------------------------------------------------------------------------------
  var container = document.getElementById("cards");
  var dirSelect = document.getElementById("filter-direction");
  var flipSelect = document.getElementById("filter-flipped");
  var sortSelect = document.getElementById("sort");
  var articles = [];

  function key(article, field) {
    var card = data.cards[Number(article.getAttribute("data-index"))];
    if (field === "delta") return card.delta;
    if (field === "l2") return card.l2;
    if (field === "tskip") return card.t_skip;
    return Number(article.getAttribute("data-index"));
  }

  function applyView() {
    var dir = dirSelect.value, flip = flipSelect.value, parts = sortSelect.value.split("-");
    var field = parts[0], descending = parts[1] === "desc";
    var order = articles.slice().sort(function (a, b) {
      var x = key(a, field), y = key(b, field);
      if (x === null && y === null) return key(a, "run") - key(b, "run");
      if (x === null) return 1;  // unknown values last, whatever the direction
      if (y === null) return -1;
      return (descending ? y - x : x - y) || key(a, "run") - key(b, "run");
    });
    var shown = 0;
    order.forEach(function (a) {
      var visible = (!dir || a.getAttribute("data-direction") === dir) &&
                    (!flip || a.getAttribute("data-flipped") === flip);
      a.hidden = !visible;
      shown += visible ? 1 : 0;
      container.appendChild(a);
    });
    document.getElementById("count").textContent = "showing " + shown + " of " + articles.length + " edits";
    document.getElementById("no-cards").hidden = shown > 0;
  }

  document.getElementById("run-folder").textContent = "editing run " + data.folder;
  renderLinks();
  renderSummary();
  renderFigures();
  data.directions.forEach(function (d) { dirSelect.appendChild(el("option", {value: d, text: d})); });
  if (!data.has_oracle) {
    flipSelect.disabled = true;
    flipSelect.title = "no oracle judged this run";
    Array.prototype.forEach.call(sortSelect.options, function (o) {
      if (o.value.indexOf("delta") === 0) { o.disabled = true; o.textContent += " (no oracle)"; }
    });
  }
  data.cards.forEach(function (card, i) {
    var article = renderCard(card, i);
    articles.push(article);
    container.appendChild(article);
  });
  [dirSelect, flipSelect, sortSelect].forEach(function (s) { s.addEventListener("change", applyView); });
  var size = document.getElementById("tile-size");
  size.addEventListener("input", function () { document.body.style.setProperty("--tile", size.value + "px"); });
  applyView();
})();
