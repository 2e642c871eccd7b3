"""Two gloo processes on the CPU produce the same store and scores as one process."""

import numpy as np

from kronlab.attribution.curvature import Curvature
from kronlab.attribution.distributed import Workers
from kronlab.attribution.pipeline import AttributionConfig, AttributionRun
from kronlab.attribution.store import GradientStore

from .gloo import run_on_ranks
from .pipeline_fixtures import tiny_task

# Two settings in one spawn: EK-FAC with projection last, and K-FAC with the folded root
# (whose store depends on the all-reduced curvature).
SETTINGS = {
    "ekfac-project": dict(method="ekfac", projection_dim=5, compression="project"),
    "kfac-folded": dict(method="kfac", projection_dim=5, compression="folded"),
}
COMMON = dict(num_queries=6, batch_size=8, chunk_rows=8, fisher="empirical", damping=0.3)


def _run(workers: Workers, directory) -> None:
    for name, settings in SETTINGS.items():
        config = AttributionConfig(**COMMON, **settings)
        run = AttributionRun(
            directory / name, config, workers=workers, task=tiny_task(), show_progress=False
        )
        run.run()


def test_two_processes_write_the_same_store_and_scores_as_one(tmp_path):
    _run(Workers(), tmp_path / "one")
    run_on_ranks(_run, 2, tmp_path, tmp_path / "two")
    for name in SETTINGS:
        one, two = tmp_path / "one" / name, tmp_path / "two" / name
        single = GradientStore.open(one / "train")
        double = GradientStore.open(two / "train")
        assert double.is_complete and double.num_chunks == 8  # 60 rows: both ranks wrote
        if name == "ekfac-project":
            # Rows come from the same chunk computations, whichever rank owned them.
            assert (one / "train" / "gradients.bin").read_bytes() == (
                two / "train" / "gradients.bin"
            ).read_bytes()
        else:
            np.testing.assert_allclose(double.read(), single.read(), rtol=1e-4, atol=1e-6)
        # All-reduced statistics give the one-process curvature (up to summation order).
        curvature_one = Curvature.load(one / "curvature.safetensors")
        curvature_two = Curvature.load(two / "curvature.safetensors")
        for module, fitted in curvature_one.modules.items():
            np.testing.assert_allclose(
                curvature_two.modules[module].eigenvalues(),
                fitted.eigenvalues(),
                rtol=1e-4,
                atol=1e-9,
            )
        scores_one = np.load(one / "scores.npy")
        scores_two = np.load(two / "scores.npy")
        np.testing.assert_allclose(
            scores_two, scores_one, rtol=1e-4, atol=1e-5 * np.abs(scores_one).max()
        )
        assert (two / "report.md").exists()
