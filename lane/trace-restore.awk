# lane/trace-restore.sh's counter: read the trace twice. Pass 1 finds each restore's marks
# ("sm: restore N start [KIND]", "sm: restore N running vcpus_us=A", then "sm: restore N ping
# done" or "sm: restore N exec done": bench_restore asks each restore one first request); pass 2
# counts events into the step of the restore they fall in: a = call -> vCPUs running, then b
# (-> first ping answered) or c (-> first `true` exec done). Restores are reported per KIND
# (bench_restore: "working-set" or "no-working-set").
function ts(   i) { for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+\.[0-9]+:$/) return substr($i, 1, length($i) - 1) + 0; return -1 }
NR == FNR {
  if ($0 !~ /tracing_mark_write: sm: restore/) next
  t = ts(); split($0, parts, "sm: restore "); split(parts[2], w, " ")
  run = w[1]
  if (w[2] == "start") { start[run] = t; kind[run] = w[3] == "" ? "all" : w[3]; kinds[kind[run]] = 1 }
  else if (w[2] == "running") { split(w[3], a, "="); ta[run] = start[run] + a[2] / 1e6 }
  else if (w[2] == "ping" && w[3] == "done") { tend[run] = t; last[run] = "b" }
  else if (w[2] == "exec" && w[3] == "done") { tend[run] = t; last[run] = "c" }
  if (run + 1 > runs) runs = run + 1
  next
}
/kvm_exit:|kvm_page_fault:/ {
  t = ts()
  for (r = 0; r < runs; r++) {
    if (!(r in tend) || !(r in ta) || t < start[r] || t > tend[r]) continue
    step = kind[r] SUBSEP (t <= ta[r] ? "a" : last[r])
    if ($0 ~ /kvm_page_fault:/) {
      faults[step]++
      match($0, /address 0x[0-9a-f]+/); gfn = substr($0, RSTART + 8, RLENGTH - 8 - 3)
      match($0, /error_code 0x[0-9a-f]+/); code = substr($0, RSTART + 11, RLENGTH - 11)
      seen[r " " gfn]++; if (seen[r " " gfn] == 2) again[step]++
      codes[step SUBSEP code]++
      break
    }
    match($0, /reason [A-Za-z_0-9]+/); reason = substr($0, RSTART + 7, RLENGTH - 7)
    exits[step]++; by[step SUBSEP reason]++
    break
  }
}
END {
  reported = 0
  for (k in kinds) reported += report(k)
  if (reported == 0) { print "no complete restore found in the trace"; exit 1 }
}
# Prints one kind's table; returns 0 (after saying so) when the trace holds none of it complete.
function report(k,   n, r, ms, cnt, i, s, key, steps, c, parts) {
  n = 0
  for (r = 0; r < runs; r++) if ((r in tend) && (r in ta) && kind[r] == k) {
    n++; cnt["a"]++; cnt[last[r]]++
    ms["a"] += (ta[r] - start[r]) * 1e3; ms[last[r]] += (tend[r] - ta[r]) * 1e3
  }
  if (n == 0) { print "no complete restore of kind " k " found in the trace"; return 0 }
  printf "\n%s: %d restores; per restore, means (a = call -> vCPUs running, all restores; then b -> first ping answered, or c -> first exec done, each on restores of its own)\n", k, n
  printf "step  restores  ms      exits    nested page faults\n"
  split("a b c", steps, " ")
  for (i = 1; i <= 3; i++) {
    s = steps[i]; key = k SUBSEP s
    if (cnt[s] > 0) printf "%-5s %-9d %-7.1f %-8.0f %.0f\n", s, cnt[s], ms[s] / cnt[s], exits[key] / cnt[s], faults[key] / cnt[s]
  }
  print "faults on a page that had faulted before in the same restore (read, then write):"
  for (i = 1; i <= 3; i++) { s = steps[i]; if (cnt[s] > 0) printf "  %s %.0f\n", s, again[k SUBSEP s] / cnt[s] }
  print "fault error codes (per restore of that step; bit 1 = write, bit 0 = present):"
  for (c in codes) { split(c, parts, SUBSEP); if (parts[1] == k) printf "  %s %s %.1f\n", parts[2], parts[3], codes[c] / cnt[parts[2]] }
  print "exits by reason (per restore of that step):"
  for (c in by) { split(c, parts, SUBSEP); if (parts[1] == k) printf "  %s %s %.1f\n", parts[2], parts[3], by[c] / cnt[parts[2]] }
  return 1
}
