// study.html: instructions and consent, a pre-test (no feedback), a lesson that depends on the participant's arm,
// a post-test on other images, and the results (CSV download; every session is also kept in this browser, and
// study.html?results=all collects them). Data: the JSON block #run-data written by diffusion/views/study.py.
// The arm and the orders follow diffusion/views/study.py (participant_arm, participant_order) exactly.
"use strict";
(function () {
  var data = JSON.parse(document.getElementById("run-data").textContent);
  var ARROW = "\u2192";
  var screens = ["intro", "test", "interlude", "lesson", "result", "collect"];
  var HEADER = ["study", "participant", "session", "arm", "phase", "trial", "image", "true_class", "answer",
                "correct", "response_ms"];
  var STORE = "diffusion-study:" + data.study_id;
  var params = new URLSearchParams(window.location.search);
  var state = null;

  function show(name) { showScreen(screens, name); }
  function pic(src, alt) { return picture(src, alt, data.pixelated); }
  function plural(n, word) { return n + " " + word + (n === 1 ? "" : "s"); }

  // ---- the participant's arm and orders (study.py: participant_arm, participant_order) ----------------------
  function armOf(pid) {
    var n = data.arms.length;
    if (/^[0-9]+$/.test(pid)) {
      var r = 0;  // the id modulo n, digit by digit (ids longer than a double's precision stay exact)
      for (var i = 0; i < pid.length; i++) r = (r * 10 + Number(pid[i])) % n;
      return data.arms[(((r + data.seed) % n) + n) % n];
    }
    return data.arms[fnv1a32(data.seed + ":" + pid) % n];
  }
  function orderOf(items, pid, phase) { return seededShuffle(items, data.seed + ":" + pid + ":" + phase); }

  // ---- answers kept in this browser ------------------------------------------------------------------------
  function loadSessions() {
    try { return JSON.parse(window.localStorage.getItem(STORE) || "[]"); } catch (e) { return null; }
  }
  function keepSession() {
    var sessions = loadSessions();
    if (sessions === null) return false;
    sessions = sessions.filter(function (s) { return s.session !== state.session || s.participant !== state.pid; });
    sessions.push({participant: state.pid, arm: state.arm, session: state.session, complete: state.complete,
                   rows: state.rows});
    try { window.localStorage.setItem(STORE, JSON.stringify(sessions)); return true; } catch (e) { return false; }
  }
  function record(phase, trial, image, truth, answer, ms) {
    state.rows.push([data.study_id, state.pid, state.session, state.arm, phase, trial, image, truth, answer,
                     answer === "" ? "" : (answer === truth ? 1 : 0), Math.round(ms)]);
    state.kept = keepSession();
  }
  function fileName(pid) { return "study_" + data.study_id + "_" + pid.replace(/[^A-Za-z0-9_-]+/g, "_") + ".csv"; }

  // ---- intro -------------------------------------------------------------------------------------------------
  if (data.classes.length === 2) {
    $("study-title").textContent = "Can you tell " + data.classes[0] + " from " + data.classes[1] + "?";
  }
  $("study-tag").textContent = "study " + data.study_id;
  $("instructions").textContent = data.instructions;
  if (data.notes.length) {
    var notes = $("organiser-notes");
    notes.appendChild(el("strong", {text: "Note for the organiser: "}));
    notes.appendChild(el("ul", {}));
    data.notes.forEach(function (n) { notes.lastChild.appendChild(el("li", {text: n})); });
    notes.hidden = false;
  }
  var canRun = data.pretest.length > 0 && data.posttest.length > 0;
  $("too-few").hidden = canRun;
  var fromUrl = (params.get("participant") || params.get("pid") || "").trim();
  if (fromUrl) {
    $("participant").value = fromUrl;
    $("participant").readOnly = true;
  }
  function idReady() {
    var pid = $("participant").value.trim();
    var done = (loadSessions() || []).filter(function (s) { return s.participant === pid && s.complete; });
    $("participant-known").hidden = !done.length;
    $("participant-known").textContent = done.length ? "This id has already completed this study in this browser (" +
      plural(done.length, "time") + "). Use a new id for a new participant." : "";
    $("start").disabled = !(canRun && pid && $("consent").checked);
  }
  $("participant").addEventListener("input", idReady);
  $("consent").addEventListener("change", idReady);
  idReady();

  // ---- tests -------------------------------------------------------------------------------------------------
  data.classes.forEach(function (cls, i) {
    var button = el("button", {type: "button", className: "button answer", "data-class": cls, disabled: true},
                    el("kbd", {text: String(i + 1)}), " " + cls);
    button.addEventListener("click", function () { answer(cls); });
    $("test-answers").appendChild(button);
  });
  function setAnswering(on) {
    state.answering = on;
    Array.prototype.forEach.call($("test-answers").children, function (b) { b.disabled = !on; });
  }

  function runTest(phase) {
    state.phase = phase;
    state.items = orderOf(data[phase], state.pid, phase);
    state.index = 0;
    show("test");
    ask();
  }

  function ask() {
    var item = state.items[state.index], part = state.phase === "pretest" ? 1 : 3;
    $("test-progress").textContent = "Part " + part + " of 3: image " + (state.index + 1) + " of " +
      state.items.length;
    setAnswering(false);
    var image = $("test-image");
    image.className = data.pixelated ? "px" : "";
    var ready = function () {  // the response time runs from the moment the image is on screen
      image.onload = image.onerror = null;
      state.shownAt = performance.now();
      setAnswering(true);
    };
    image.onload = image.onerror = ready;
    image.src = item.image;
    if (image.complete && image.naturalWidth > 0) ready();
  }

  function answer(cls) {
    if (!state || !state.answering || $("test").hidden) return;
    setAnswering(false);
    var item = state.items[state.index];
    var truth = data.classes[decodeClass(item.token, data.key, item.image)];
    record(state.phase, state.index + 1, item.image, truth, cls, performance.now() - state.shownAt);
    state.index += 1;
    if (state.index < state.items.length) { ask(); return; }
    if (state.phase === "pretest") {
      interlude("Part 1 done", "Next: a short lesson about what tells " + listing(data.classes) + " apart.",
                startLesson);
    } else {
      finish();
    }
  }

  function interlude(title, text, next) {
    $("interlude-title").textContent = title;
    $("interlude-text").textContent = text;
    state.next = next;
    show("interlude");
  }

  // ---- lesson ------------------------------------------------------------------------------------------------
  var LESSON_TEXT = {
    counterfactual: "Each row shows a real image, the same image changed as little as possible so that it becomes " +
      "the other class, and the two alternating. What changes is what tells the classes apart.",
    counterfactual_diff: "Each row shows a real image, the same image changed as little as possible so that it " +
      "becomes the other class, the two alternating, and a map of where they differ (brighter: more change). " +
      "What changes is what tells the classes apart.",
    examples: "Here are real examples of each class. Look at what the images of one class have in common and how " +
      "they differ from the other class."
  };

  function lessonPair(item, withDiff) {
    return el("div", {className: "lesson-pair"},
      el("figure", {}, pic(item.original, "real " + item["class"]),
         el("figcaption", {}, el("strong", {text: item["class"]}), " (real)")),
      el("figure", {}, pic(item.counterfactual, "edited to " + item.target),
         el("figcaption", {}, "as ", el("strong", {text: item.target}), " (edited)")),
      el("figure", {}, pic(item.gif, "the two alternating"),
         el("figcaption", {text: item["class"] + " " + ARROW + " " + item.target})),
      withDiff ? el("figure", {}, pic(item.diff, "where they differ"),
                    el("figcaption", {text: "where they differ"})) : null);
  }

  function startLesson() {
    var items = orderOf(data.lesson, state.pid, "lesson"), box = $("lesson-items");
    box.replaceChildren();
    $("lesson-text").textContent = items.length ? LESSON_TEXT[state.arm] :
      "This run has no lesson images; continue to part 3.";
    if (state.arm === "examples") {
      data.classes.forEach(function (cls) {
        var mine = items.filter(function (it) { return it["class"] === cls; });
        if (!mine.length) return;
        box.appendChild(el("h3", {className: "example-head", text: "Examples of " + cls}));
        var row = el("div", {className: "example-row"});
        mine.forEach(function (it) {
          row.appendChild(el("figure", {}, pic(it.original, "a real " + cls),
                             el("figcaption", {}, el("strong", {text: cls}))));
        });
        box.appendChild(row);
      });
    } else {
      items.forEach(function (it) { box.appendChild(lessonPair(it, state.arm === "counterfactual_diff")); });
    }
    state.phase = "lesson";
    state.lessonAt = performance.now();
    show("lesson");
  }

  function lessonDone() {
    if (!state || state.phase !== "lesson") return;
    record("lesson", 0, "", "", "", performance.now() - state.lessonAt);
    state.phase = "between";
    interlude("Part 2 done", "Part 3: new images, as in part 1. Classify each on your own.", function () {
      runTest("posttest");
    });
  }

  // ---- results -----------------------------------------------------------------------------------------------
  function score(phase) {
    var mine = state.rows.filter(function (r) { return r[4] === phase; });
    var right = mine.filter(function (r) { return r[9] === 1; }).length;
    return right + " of " + mine.length;
  }

  function finish() {
    state.complete = true;
    state.kept = keepSession();
    $("result-text").textContent = "You classified " + score("pretest") + " images right in part 1 and " +
      score("posttest") + " in part 3.";
    var facts = $("result-facts");
    facts.replaceChildren();
    [["participant", state.pid], ["arm", state.arm], ["study", data.study_id], ["session", state.session]]
      .forEach(function (f) { facts.appendChild(el("dt", {text: f[0]})); facts.appendChild(el("dd", {text: f[1]})); });
    $("kept").textContent = state.kept ?
      "These answers are also kept in this browser: study.html?results=all collects every participant's." :
      "This browser does not keep the answers: download them now.";
    show("result");
  }

  function start() {
    var pid = $("participant").value.trim();
    if (!pid || $("start").disabled) return;
    state = {pid: pid, arm: armOf(pid), session: new Date().toISOString(), rows: [], complete: false,
             answering: false, kept: false};
    runTest("pretest");
  }

  // ---- collecting the answers kept in this browser (?results=all) ------------------------------------------
  function collect() {
    var sessions = loadSessions();
    show("collect");
    if (sessions === null) {
      $("collect-text").textContent = "This browser does not let the page keep answers (local storage is off).";
      $("download-all").disabled = $("clear-all").disabled = true;
      return;
    }
    var done = sessions.filter(function (s) { return s.complete; }).length;
    $("collect-text").textContent = plural(sessions.length, "session") + " of study " + data.study_id +
      " kept in this browser, " + done + " complete.";
    var body = el("tbody");
    sessions.forEach(function (s) {
      body.appendChild(el("tr", {}, el("td", {text: s.participant}), el("td", {text: s.arm}),
                          el("td", {text: s.session}), el("td", {text: String(s.rows.length)}),
                          el("td", {text: s.complete ? "yes" : "no"})));
    });
    var head = el("tr", {});
    ["participant", "arm", "session", "rows", "complete"].forEach(function (h) { head.appendChild(el("th", {text: h})); });
    $("collect-table").replaceChildren(el("table", {}, el("thead", {}, head), body));
    $("download-all").disabled = $("clear-all").disabled = !sessions.length;
  }

  $("start").addEventListener("click", start);
  $("interlude-next").addEventListener("click", function () { if (state && state.next) state.next(); });
  $("lesson-done").addEventListener("click", lessonDone);
  $("download").addEventListener("click", function () {
    downloadText(csvText(HEADER, state.rows), fileName(state.pid));
  });
  $("next-participant").addEventListener("click", function () {
    window.location.href = window.location.pathname;
  });
  $("download-all").addEventListener("click", function () {
    var rows = [];
    (loadSessions() || []).forEach(function (s) { rows = rows.concat(s.rows); });
    downloadText(csvText(HEADER, rows), "study_" + data.study_id + "_all.csv");
  });
  $("clear-all").addEventListener("click", function () {
    if (!window.confirm("Delete every answer of this study kept in this browser? Download them first.")) return;
    window.localStorage.removeItem(STORE);
    collect();
  });
  document.addEventListener("keydown", function (ev) {
    if ($("test").hidden) return;
    var k = Number(ev.key);
    if (k >= 1 && k <= data.classes.length) answer(data.classes[k - 1]);
  });

  if (params.has("results")) collect();
})();
