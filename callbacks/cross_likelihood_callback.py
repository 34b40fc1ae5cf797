"""Writes the cross-likelihood results of a test loop (files on rank zero, W&B tables and heatmaps), with the
discrimination report beside them when the loop kept its per-crop values."""
from callbacks import cross_likelihood_report, discrimination_report
from callbacks.results_report import ResultsReport


class CrossLikelihoodReport(ResultsReport):
    def write(self, results):
        paths = cross_likelihood_report.write_report(results, self.out_dir, self.config)
        if results.get("per_crop"):
            paths.update(discrimination_report.write_report(results, self.out_dir, self.config))
        return paths

    def log_to_wandb(self, results, run):
        cross_likelihood_report.log_to_wandb(results, run, paths=self.paths)
        if results.get("per_crop"):
            discrimination_report.log_to_wandb(results, run, paths=self.paths)
