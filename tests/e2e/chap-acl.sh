#!/usr/bin/env bash
# Cases: chap-good, chap-bad-refused, acl-outsider-refused.
# t1 requires one-way CHAP; t2 admits one initiator name only (InitiatorGroup spec.initiators).
. "$(dirname "$0")/lib.sh"
e2e_cases chap-good chap-bad-refused acl-outsider-refused || exit 0
CHAP_USER=e2euser CHAP_SECRET=e2esecret1234
ALLOWED=iqn.2026-11.io.ktgt.e2e:allowed OUTSIDER=iqn.2026-11.io.ktgt.e2e:outsider
cfg_target t1 iqn.2026-11.io.ktgt.e2e:chap
cfg_lun t1 1 64Mi
cfg_chap t1 $CHAP_USER $CHAP_SECRET
cfg_target t2 iqn.2026-11.io.ktgt.e2e:acl
cfg_lun t2 1 64Mi
cfg_initiators t2 $ALLOWED
target_start || exit 0
O=$WORK/out

if e2e_want chap-good; then
  if run 20 iscsi-inq -i $E2E_INITIATOR "$(chap_url t1 1)" >"$O" 2>&1 && grep -q DIRECT_ACCESS "$O"; then
    pass chap-good
  else fail chap-good "iscsi-inq with the right secret failed" "$O"; fi
fi

if e2e_want chap-bad-refused; then
  before=$(wc -l <"$LOG")
  run 20 iscsi-inq -i $E2E_INITIATOR "$(url t1 1 "$CHAP_USER%wrongsecret99@")" >"$O" 2>&1; rc=$?
  run 20 iscsi-inq -i $E2E_INITIATOR "$(url t1 1)" >"$O.nocreds" 2>&1; rc2=$?
  sleep 0.5
  newlog=$(tail -n +"$((before + 1))" "$LOG")
  if [ "$rc" = 0 ]; then fail chap-bad-refused "login with a wrong secret succeeded" "$O"
  elif [ "$rc" = 124 ]; then fail chap-bad-refused "iscsi-inq with a wrong secret timed out (no clean refusal)" "$O"
  elif ! grep -qiE 'authentication failure|Login Failed' "$O"; then fail chap-bad-refused "exit $rc but not a login refusal" "$O"
  elif [ "$rc2" = 0 ]; then fail chap-bad-refused "login without credentials succeeded" "$O.nocreds"
  elif ! target_alive; then fail chap-bad-refused "the target died" "$LOG"
  elif [ "$E2E_TARGET" = ktgt ] && ! grep -qiE 'chap|auth' <<<"$newlog"; then
    printf '%s\n' "$newlog" >"$O.log"; fail chap-bad-refused "refused, but the agent log does not mention it (CHAP/auth)" "$O.log"
  elif ! run 20 iscsi-inq -i $E2E_INITIATOR "$(chap_url t1 1)" >"$O" 2>&1; then fail chap-bad-refused "a good login after the refusal failed" "$O"
  else pass chap-bad-refused; fi
fi

if e2e_want acl-outsider-refused; then
  run 20 iscsi-inq -i $OUTSIDER "$(url t2 1)" >"$O" 2>&1; rc=$?
  if [ "$rc" = 0 ]; then fail acl-outsider-refused "$OUTSIDER logged in" "$O"
  elif [ "$rc" = 124 ]; then fail acl-outsider-refused "login of $OUTSIDER timed out (no clean refusal)" "$O"
  elif ! target_alive; then fail acl-outsider-refused "the target died" "$LOG"
  elif ! run 20 iscsi-inq -i $ALLOWED "$(url t2 1)" >"$O" 2>&1; then fail acl-outsider-refused "the admitted $ALLOWED cannot log in" "$O"
  else pass acl-outsider-refused; fi
fi
exit 0
