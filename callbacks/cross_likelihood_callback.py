"""Writes the cross-likelihood results of a test loop (files on rank zero, W&B tables and heatmaps)."""
from callbacks import cross_likelihood_report
from callbacks.results_report import ResultsReport


class CrossLikelihoodReport(ResultsReport):
    def write(self, results):
        return cross_likelihood_report.write_report(results, self.out_dir, self.config)

    def log_to_wandb(self, results, run):
        cross_likelihood_report.log_to_wandb(results, run, paths=self.paths)
