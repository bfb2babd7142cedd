"""A sphinx-gallery image scraper for matplotlib Figures built without pyplot.

``sksegcal.plotting`` returns ``matplotlib.figure.Figure`` objects that are not
registered with pyplot (so a script never opens a window), which the
standard matplotlib scraper does not see. This scraper picks up every such
Figure bound to a variable of the example after each code block, once.
sphinx-gallery finds it by module name (``image_scrapers``), which keeps the
Sphinx configuration picklable.
"""

from __future__ import annotations

_MARK = "_sksegcal_gallery_scraped"


class FigureScraper:
    def __repr__(self) -> str:  # stable, so Sphinx's config cache does not rebuild
        return "FigureScraper()"

    def __call__(self, block, block_vars, gallery_conf):
        from matplotlib.figure import Figure
        from sphinx_gallery.scrapers import figure_rst

        paths = []
        for value in list(block_vars["example_globals"].values()):
            if not isinstance(value, Figure) or getattr(value, _MARK, False):
                continue
            if value.canvas.manager is not None:  # a pyplot figure: matplotlib's scraper
                continue
            setattr(value, _MARK, True)  # the scraper may be re-created per block
            path = next(block_vars["image_path_iterator"])
            value.savefig(path, dpi=80)
            paths.append(path)
        return figure_rst(paths, gallery_conf["src_dir"])


def _get_sg_image_scraper():
    return FigureScraper()
