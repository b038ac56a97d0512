// Shared by quiz.js and study.js: the functions of diffusion/views/blind.py, bit for bit (32-bit FNV-1a, mulberry32,
// the seeded Fisher-Yates shuffle, answer tokens), and the CSV download. A token is decoded only when an answer is
// recorded; the key sits in the page, so this keeps answers out of sight, it does not make them secret.
"use strict";

function fnv1a32(text) {
  var bytes = new TextEncoder().encode(text), h = 0x811c9dc5;
  for (var i = 0; i < bytes.length; i++) h = Math.imul(h ^ bytes[i], 0x01000193) >>> 0;
  return h >>> 0;
}

// mulberry32: a function returning the next unsigned 32-bit integer of the stream seeded by `seed`.
function mulberry32(seed) {
  var a = seed >>> 0;
  return function () {
    a = (a + 0x6d2b79f5) >>> 0;
    var t = Math.imul(a ^ (a >>> 15), 1 | a);
    t = ((t + Math.imul(t ^ (t >>> 7), 61 | t)) >>> 0) ^ t;
    return (t ^ (t >>> 14)) >>> 0;
  };
}

// A copy of `items` shuffled by Fisher-Yates with mulberry32(fnv1a32(seedText)) (blind.py: seeded_shuffle).
function seededShuffle(items, seedText) {
  var out = items.slice(), draw = mulberry32(fnv1a32(seedText));
  for (var i = out.length - 1; i > 0; i--) {
    var j = draw() % (i + 1), swap = out[i];
    out[i] = out[j];
    out[j] = swap;
  }
  return out;
}

// The class index hidden in a question's token (blind.py: decode_class).
function decodeClass(token, key, image) {
  var raw = atob(token), draw = mulberry32(fnv1a32(key + "|" + image)), digits = "";
  for (var i = 0; i < raw.length; i++) digits += String.fromCharCode(raw.charCodeAt(i) ^ (draw() >>> 24));
  return parseInt(digits, 10);
}

// A CSV file from a header and rows (every cell quoted), offered as a download.
function csvText(header, rows) {
  var quote = function (s) { return "\"" + String(s === null || s === undefined ? "" : s).replace(/"/g, "\"\"") + "\""; };
  return [header.join(",")].concat(rows.map(function (r) { return r.map(quote).join(","); })).join("\n") + "\n";
}

function downloadText(text, name, type) {
  var link = el("a", {href: URL.createObjectURL(new Blob([text], {type: type || "text/csv"})), download: name});
  document.body.appendChild(link);
  link.click();
  link.remove();
}
