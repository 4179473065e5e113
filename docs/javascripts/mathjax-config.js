// MathJax 3 (bundled into the site by docs/hooks.py from the django-static-mathjax wheel: no CDN
// at build or view time). Markdown pages: pymdownx.arithmatex wraps maths in .arithmatex with
// \( \) and \[ \]; tutorial pages (mkdocs-jupyter): markdown cells keep $ ... $ and $$ ... $$.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"], ["$", "$"]],
    displayMath: [["\\[", "\\]"], ["$$", "$$"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex|jp-RenderedMarkdown",
  },
};
