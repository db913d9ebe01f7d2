# lane/trace-restore.sh's counter: read the trace twice. Pass 1 finds each restore's marks
# ("sm: restore N start", "sm: restore N agent vcpus_us=A agent_us=B", "sm: restore N exec
# done"); pass 2 counts events into the step of the restore they fall in.
function ts(   i) { for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+\.[0-9]+:$/) return substr($i, 1, length($i) - 1) + 0; return -1 }
NR == FNR {
  if ($0 !~ /tracing_mark_write: sm: restore/) next
  t = ts(); split($0, parts, "sm: restore "); split(parts[2], w, " ")
  run = w[1]
  if (w[2] == "start") start[run] = t
  else if (w[2] == "agent") {
    split(w[3], a, "="); split(w[4], b, "=")
    ta[run] = start[run] + a[2] / 1e6; tb[run] = start[run] + b[2] / 1e6
  } else if (w[2] == "exec") tc[run] = t
  if (run + 1 > runs) runs = run + 1
  next
}
/kvm_exit:|kvm_page_fault:/ {
  t = ts()
  for (r = 0; r < runs; r++) {
    if (!(r in tc) || t < start[r] || t > tc[r]) continue
    step = t <= ta[r] ? "a" : (t <= tb[r] ? "b" : "c")
    if ($0 ~ /kvm_page_fault:/) {
      faults[step]++
      match($0, /address 0x[0-9a-f]+/); gfn = substr($0, RSTART + 8, RLENGTH - 8 - 3)
      match($0, /error_code 0x[0-9a-f]+/); code = substr($0, RSTART + 11, RLENGTH - 11)
      seen[r " " gfn]++; if (seen[r " " gfn] == 2) again[step]++
      codes[step " " code]++
      break
    }
    match($0, /reason [A-Za-z_0-9]+/); reason = substr($0, RSTART + 7, RLENGTH - 7)
    exits[step]++; by[step " " reason]++
    break
  }
}
END {
  n = 0; for (r = 0; r < runs; r++) if (r in tc) n++
  if (n == 0) { print "no complete restore found in the trace"; exit 1 }
  printf "per restore, mean of %d (steps: a = call -> vCPUs running, b -> agent answered, c -> first exec done)\n", n
  for (r = 0; r < runs; r++) if (r in tc) {
    da += (ta[r] - start[r]) * 1e3; db += (tb[r] - ta[r]) * 1e3; dc += (tc[r] - tb[r]) * 1e3
  }
  printf "step  ms      exits    nested page faults\n"
  split("a b c", steps, " "); ms["a"] = da / n; ms["b"] = db / n; ms["c"] = dc / n
  for (i = 1; i <= 3; i++) { s = steps[i]; printf "%-5s %-7.1f %-8.0f %.0f\n", s, ms[s], exits[s] / n, faults[s] / n }
  print "faults on a page that had faulted before in the same restore (read, then write):"
  for (i = 1; i <= 3; i++) { s = steps[i]; printf "  %s %.0f\n", s, again[s] / n }
  print "fault error codes (per restore; bit 1 = write, bit 0 = present):"
  for (k in codes) printf "  %s %.1f\n", k, codes[k] / n
  print "exits by reason (per restore):"
  for (k in by) printf "  %s %.1f\n", k, by[k] / n
}
