// quiz.html: an optional lesson of counterfactual pairs, then a quiz on real images not shown in the lesson, scored
// in the page. Data: the JSON block #run-data written by diffusion/views/quiz.py (lesson pairs; quiz images, opaque
// copies already shuffled with a fixed seed, each with a token of its true class that blind.js decodes only once
// the question is answered). No libraries, no network.
"use strict";
(function () {
  var data = JSON.parse(document.getElementById("run-data").textContent);
  var ARROW = "\u2192";
  var screens = ["intro", "lesson", "quiz", "result"];
  var state = {index: 0, answers: [], shownAt: 0, waiting: false};

  function show(name) { showScreen(screens, name); }
  function pic(src, alt) { return picture(src, alt, data.pixelated); }

  // ---- intro and lesson ---------------------------------------------------------------------------------------
  if (data.classes.length === 2) {
    $("quiz-title").textContent = "Can you tell " + data.classes[0] + " from " + data.classes[1] + "?";
  }
  $("intro-text").textContent = "Learn to tell " + listing(data.classes) + " apart: " + data.lesson.length +
    " lesson pair" + (data.lesson.length === 1 ? "" : "s") + ", then " + data.quiz.length + " quiz image" +
    (data.quiz.length === 1 ? "" : "s") + ".";
  if (!data.quiz.length) {
    $("too-few").hidden = false;
    $("skip-lesson").disabled = true;
    $("lesson-done").disabled = true;
  }
  if (!data.lesson.length) $("start-lesson").disabled = true;

  $("lesson-text").textContent = "Left: a real image and its class. Middle: the same image, changed as little as " +
    "possible so that it becomes the other class. Right: the two alternating. What changes is what tells the " +
    "classes apart.";
  data.lesson.forEach(function (item) {
    var pair = el("div", {className: "lesson-pair"},
      el("figure", {}, pic(item.original, "real " + item.source_class),
         el("figcaption", {}, el("strong", {text: item.source_class}), " (real)")),
      el("figure", {}, pic(item.counterfactual, "edited to " + item.target_class),
         el("figcaption", {}, "as ", el("strong", {text: item.target_class}), " (edited)")),
      el("figure", {}, pic(item.gif, "flicker between the two"),
         el("figcaption", {text: item.source_class + " " + ARROW + " " + item.target_class})));
    $("lesson-pairs").appendChild(pair);
  });

  // ---- quiz ---------------------------------------------------------------------------------------------------
  data.classes.forEach(function (cls, i) {
    var button = el("button", {type: "button", className: "button answer", "data-class": cls},
                    el("kbd", {text: String(i + 1)}), " " + cls);
    button.addEventListener("click", function () { answer(cls); });
    $("answers").appendChild(button);
  });

  function ask() {
    var item = data.quiz[state.index];
    state.waiting = false;
    $("progress").textContent = "Question " + (state.index + 1) + " of " + data.quiz.length;
    var image = $("quiz-image");
    image.className = data.pixelated ? "px" : "";
    image.src = item.image;
    $("feedback-text").hidden = true;
    $("next").hidden = true;
    Array.prototype.forEach.call($("answers").children, function (b) { b.disabled = false; });
    state.shownAt = Date.now();
  }

  function answer(cls) {
    if (state.waiting || $("quiz").hidden) return;
    var item = data.quiz[state.index];
    var truth = data.classes[decodeClass(item.token, data.key, item.image)];
    var correct = cls === truth;
    state.answers.push({image: item.image, truth: truth, answer: cls, correct: correct,
                        ms: Date.now() - state.shownAt});
    if ($("feedback").checked) {
      state.waiting = true;
      Array.prototype.forEach.call($("answers").children, function (b) { b.disabled = true; });
      var text = $("feedback-text");
      text.textContent = correct ? "Right: this is " + truth + "." : "Not quite: this is " + truth + ".";
      text.className = "feedback " + (correct ? "right" : "wrong");
      text.hidden = false;
      $("next").hidden = false;
      $("next").focus();
    } else {
      advance();
    }
  }

  function next() {
    if (!state.waiting) return;  // Enter on the focused button fires both the key handler and a click
    advance();
  }

  function advance() {
    state.index += 1;
    if (state.index < data.quiz.length) ask();
    else finish();
  }

  function startQuiz() {
    state = {index: 0, answers: [], shownAt: 0, waiting: false};
    show("quiz");
    ask();
  }

  // ---- result -------------------------------------------------------------------------------------------------
  function finish() {
    var right = state.answers.filter(function (a) { return a.correct; }).length, n = state.answers.length;
    $("score").textContent = "You scored " + right + " of " + n + " (" + Math.round(100 * right / n) + "%)";
    var rows = data.classes.map(function (cls) {
      var mine = state.answers.filter(function (a) { return a.truth === cls; });
      var ok = mine.filter(function (a) { return a.correct; }).length;
      return el("tr", {}, el("td", {text: cls}), el("td", {text: mine.length ? ok + " of " + mine.length : "\u2013"}));
    });
    var head = el("tr", {}, el("th", {text: "true class"}), el("th", {text: "right"}));
    var table = el("table", {}, el("thead", {}, head));
    var body = el("tbody");
    rows.forEach(function (r) { body.appendChild(r); });
    table.appendChild(body);
    $("per-class").replaceChildren(table);
    $("review").replaceChildren.apply($("review"), state.answers.map(function (a) {
      return el("figure", {className: a.correct ? "right" : "wrong"}, pic(a.image, "quiz image"),
                el("figcaption", {text: (a.correct ? "\u2713 " : "\u2717 ") + "you: " + a.answer + ", true: " +
                                        a.truth}));
    }));
    show("result");
  }

  function downloadCsv() {
    downloadText(csvText(["question", "image", "true_class", "answer", "correct", "milliseconds"],
                         state.answers.map(function (a, i) {
                           return [i + 1, decodeURIComponent(a.image), a.truth, a.answer, a.correct ? 1 : 0, a.ms];
                         })), "quiz_answers.csv");
  }

  $("start-lesson").addEventListener("click", function () { show("lesson"); });
  $("skip-lesson").addEventListener("click", startQuiz);
  $("lesson-done").addEventListener("click", startQuiz);
  $("next").addEventListener("click", next);
  $("restart").addEventListener("click", function () { show("intro"); });
  $("download").addEventListener("click", downloadCsv);
  document.addEventListener("keydown", function (ev) {
    if ($("quiz").hidden) return;
    if (state.waiting && ev.key === "Enter") { ev.preventDefault(); next(); return; }
    var k = Number(ev.key);
    if (k >= 1 && k <= data.classes.length) answer(data.classes[k - 1]);
  });
})();
