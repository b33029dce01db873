"""Running a benchmark or training script's ``main`` from a test: the scripts fix torch's thread count for their
own measurements, and the test suite's count must survive them."""
import torch


def run_main(main, argv: list[str]):
    """``main(argv)``, torch's thread count put back afterwards; returns what ``main`` returned."""
    threads = torch.get_num_threads()
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)
