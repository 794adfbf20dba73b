/* api/monitor.h - see pycri.h for the conventions.
 *
 * The per-container monitor is an executable (csrc/main_monitor.c, built by
 * setup.py into pycri/pycri-monitor), not a function of pycri._core: it must
 * outlive the Python process. Its contract (command line, CRI log, exit file,
 * attach protocol) is documented at the top of main_monitor.c; Python's side is
 * the "monitor" section of pycri/_native.py. Nothing to declare here.
 */
