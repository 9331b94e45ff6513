"""`stepfleet up`: a whole fleet on one machine — router, worker processes, control loop.

The local fleet is the operator's control loop with processes in place of Deployments: it
observes the workers (their `/metrics`, scraped as the operator does without Prometheus),
runs the same pure `decide`, and acts by starting and stopping worker processes and by
rewriting the router's config file, which the router re-reads live.

Split as the operator is, so the rules are tested without processes:

- `fleet` (pure): the pools from the command line, the policy spec, the observation built
  from worker states and scrapes, and the router config for a set of workers and weights;
- `supervise` (pure): desired workers per pool vs the workers there are → actions (start,
  restart with backoff, stop, forget), each with the reason printed to the user;
- `processes` (thin): `subprocess.Popen`, readiness probes, scrapes, signals;
- `cli`: the `stepfleet up` command and its loop.
"""
