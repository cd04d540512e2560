"""The order of the example gallery: from the quickstart to scaling out."""

from pathlib import Path

ORDER = [
    "plot_quickstart.py",
    "plot_filter_mislabeled.py",
    "plot_scores_to_decisions.py",
    "plot_images_cnn.py",
    "text_transformer.py",
    "finetune_attribution.py",
    "plot_huggingface_text.py",
    "plot_grid_search_strategies.py",
    "dask_cluster.py",
]


class ExampleOrder:
    """Sort key for sphinx-gallery's ``within_subsection_order``; examples not
    listed come last, by name."""

    def __init__(self, src_dir):
        self.src_dir = src_dir

    def __call__(self, filename):
        name = Path(filename).name
        return (ORDER.index(name), name) if name in ORDER else (len(ORDER), name)
