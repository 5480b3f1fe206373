"""The job queue with an engine pool's slots (webui/job_queue.py): pooled jobs run side by side, up to one per
replica, first come first served; the front's own jobs still run one at a time; without a pool, one job at a time."""

from __future__ import annotations

import threading
import time

from webui.job_queue import JobQueue


def run_jobs(queue: JobQueue, kinds: list[bool], hold: float = 0.3) -> int:
    """Queue a job per entry (True: pooled) at once; the most that ran at the same moment."""
    lock = threading.Lock()
    now, most = [0], [0]

    def job(_control) -> None:
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
        time.sleep(hold)
        with lock:
            now[0] -= 1

    threads = [threading.Thread(target=queue.run, args=(job,), kwargs={"source": "api", "pooled": pooled})
               for pooled in kinds]
    for thread in threads:
        thread.start()
        time.sleep(0.02)  # keep the order of arrival
    for thread in threads:
        thread.join(30)
    return most[0]


def test_without_a_pool_one_job_runs_at_a_time_pooled_or_not():
    assert run_jobs(JobQueue(), [True, True, False]) == 1


def test_pooled_jobs_run_one_per_slot():
    assert run_jobs(JobQueue(slots=2), [True, True, True, True]) == 2


def test_front_jobs_run_one_at_a_time_beside_pooled_ones():
    assert run_jobs(JobQueue(slots=3), [False, False, False]) == 1
    assert run_jobs(JobQueue(slots=2), [True, False]) == 2


def test_the_queue_names_where_a_job_runs_and_interrupts_every_running_job():
    queue = JobQueue(slots=2, placement=lambda control: "replica-1" if control.interrupted else "")
    started, tickets = threading.Barrier(3), []

    def job(control) -> None:
        started.wait(10)
        while not control.interrupted:
            time.sleep(0.01)

    threads = [threading.Thread(target=queue.run, args=(job,),
                                kwargs={"source": "ui", "pooled": True, "on_ticket": tickets.append})
               for _ in range(2)]
    for thread in threads:
        thread.start()
    started.wait(10)
    assert len(queue.running_tickets) == 2 and queue.running is queue.running_tickets[0]
    assert [queue.where(t) for t in tickets] == ["", ""]
    queue.interrupt()
    assert [queue.where(t) for t in tickets] == ["replica-1", "replica-1"]
    for thread in threads:
        thread.join(10)
    assert queue.running is None and queue.finished_jobs == 2
