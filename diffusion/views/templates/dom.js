// Shared by every page's script (gallery.js, quiz.js, study.js): diffusion/views/pages.py inlines it first.
"use strict";

// el("div", {className: "card", text: "..."}, child, ...): an element with attributes (null/false ones left out;
// true as a bare attribute) and children (strings become text nodes; null children skipped).
function el(tag, attrs) {
  var node = document.createElement(tag);
  Object.keys(attrs || {}).forEach(function (key) {
    var value = attrs[key];
    if (value === null || value === undefined || value === false) return;
    if (key === "text") node.textContent = value;
    else if (key === "className") node.className = value;
    else node.setAttribute(key, value === true ? "" : value);
  });
  for (var i = 2; i < arguments.length; i++) {
    var child = arguments[i];
    if (child === null || child === undefined) continue;
    node.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
  }
  return node;
}

// $("id"): the element with that id.
function $(id) { return document.getElementById(id); }

// Show one of a page's screens (sections by id) and hide the others.
function showScreen(screens, name) {
  screens.forEach(function (s) { $(s).hidden = s !== name; });
  window.scrollTo(0, 0);
}

// An image (crisp pixels when small images are enlarged), or a placeholder when its file is missing.
function picture(src, alt, pixelated) {
  return src ? el("img", {src: src, alt: alt, className: pixelated ? "px" : null})
             : el("div", {className: "missing", text: "(image missing)"});
}

// "a", "a and b", "a, b and c".
function listing(names) {
  return names.length < 2 ? names.join("") : names.slice(0, -1).join(", ") + " and " + names[names.length - 1];
}
