// A small Markdown renderer for answers: paragraphs, headings, lists, quotes, fenced code,
// inline code, bold, italics and links. It builds DOM nodes and sets only textContent, so
// whatever a model writes (<script>, <img onerror>, ...) stays text. Links are kept only for
// http(s) and mailto addresses and open in a new tab without a referrer.
"use strict";

window.Appliance.renderMarkdown = (() => {
  const { el } = window.Appliance;
  const SAFE_LINK = /^(https?:\/\/|mailto:)/i;
  // Longest first: ** before *, so bold is not read as two italics.
  // Emphasis needs text right inside its markers, and `_` only around whole words, so
  // `2 * 3 * 4` and snake_case_names stay as written.
  const INLINE = new RegExp(
    [
      "(`+)([\\s\\S]*?[^`])\\1(?!`)",
      "\\*\\*(?!\\s)([^*\\n]+?)(?<!\\s)\\*\\*",
      "(?<!\\w)__(?!\\s)([^_\\n]+?)(?<!\\s)__(?!\\w)",
      "\\*(?!\\s)([^*\\n]+?)(?<!\\s)\\*",
      "(?<!\\w)_(?!\\s)([^_\\n]+?)(?<!\\s)_(?!\\w)",
      "\\[([^\\]\\n]+)\\]\\(([^)\\s]+)\\)",
    ].join("|"),
    "g",
  );

  function inline(text) {
    const nodes = [];
    let last = 0;
    for (const match of text.matchAll(INLINE)) {
      if (match.index > last) nodes.push(text.slice(last, match.index));
      const [whole, , code, bold1, bold2, em1, em2, label, href] = match;
      if (code !== undefined) nodes.push(el("code", {}, code));
      else if (bold1 !== undefined || bold2 !== undefined) {
        nodes.push(el("strong", {}, ...inline(bold1 !== undefined ? bold1 : bold2)));
      } else if (em1 !== undefined || em2 !== undefined) {
        nodes.push(el("em", {}, ...inline(em1 !== undefined ? em1 : em2)));
      } else if (label !== undefined) {
        if (SAFE_LINK.test(href)) {
          nodes.push(el("a", { href, target: "_blank", rel: "noopener noreferrer" }, label));
        } else {
          nodes.push(whole); // a javascript: or data: link stays visible text
        }
      }
      last = match.index + whole.length;
    }
    if (last < text.length) nodes.push(text.slice(last));
    return nodes;
  }

  function paragraph(lines) {
    const nodes = [];
    lines.forEach((line, index) => {
      if (index > 0) nodes.push(el("br"));
      nodes.push(...inline(line));
    });
    return el("p", {}, ...nodes);
  }

  const FENCE = /^\s*(```|~~~)\s*([\w+-]*)\s*$/;
  const HEADING = /^(#{1,6})\s+(.*)$/;
  const BULLET = /^\s*[-*+]\s+(.*)$/;
  const NUMBERED = /^\s*(\d{1,9})[.)]\s+(.*)$/;
  const QUOTE = /^\s*>\s?(.*)$/;

  function blocks(lines) {
    const out = [];
    let index = 0;
    while (index < lines.length) {
      const line = lines[index];
      const fence = FENCE.exec(line);
      if (fence) {
        const body = [];
        index += 1;
        // An unclosed fence (an answer still streaming) runs to the end.
        while (index < lines.length && !lines[index].trim().startsWith(fence[1])) {
          body.push(lines[index]);
          index += 1;
        }
        index += 1;
        const code = el("code", fence[2] ? { class: `language-${fence[2]}` } : {}, body.join("\n"));
        out.push(el("pre", {}, code));
        continue;
      }
      if (!line.trim()) {
        index += 1;
        continue;
      }
      const heading = HEADING.exec(line);
      if (heading) {
        // Answers are inside the page: their headings start below the page's own.
        const level = Math.min(6, heading[1].length + 2);
        out.push(el(`h${level}`, {}, ...inline(heading[2])));
        index += 1;
        continue;
      }
      const listTag = BULLET.test(line) ? "ul" : NUMBERED.test(line) ? "ol" : null;
      if (listTag) {
        const pattern = listTag === "ul" ? BULLET : NUMBERED;
        const items = [];
        let start = null;
        while (index < lines.length && pattern.test(lines[index])) {
          const match = pattern.exec(lines[index]);
          if (listTag === "ol" && start === null) start = parseInt(match[1], 10);
          items.push(el("li", {}, ...inline(listTag === "ol" ? match[2] : match[1])));
          index += 1;
        }
        out.push(el(listTag, listTag === "ol" && start !== 1 ? { start } : {}, ...items));
        continue;
      }
      if (QUOTE.test(line)) {
        const quoted = [];
        while (index < lines.length && QUOTE.test(lines[index])) {
          quoted.push(QUOTE.exec(lines[index])[1]);
          index += 1;
        }
        out.push(el("blockquote", {}, ...blocks(quoted)));
        continue;
      }
      const text = [];
      while (
        index < lines.length && lines[index].trim() && !FENCE.test(lines[index]) &&
        !HEADING.test(lines[index]) && !BULLET.test(lines[index]) &&
        !NUMBERED.test(lines[index]) && !QUOTE.test(lines[index])
      ) {
        text.push(lines[index]);
        index += 1;
      }
      out.push(paragraph(text));
    }
    return out;
  }

  // Replace `container`'s children with `text` rendered.
  return function renderMarkdown(text, container) {
    container.replaceChildren(...blocks(String(text).replace(/\r\n?/g, "\n").split("\n")));
  };
})();
