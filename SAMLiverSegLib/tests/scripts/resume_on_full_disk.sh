# Resume a training run on a full disk (test_training_bad_input.test_full_disk_while_checkpointing_exit_3_previous_kept);
# run inside a private user+mount namespace: `unshare -rm sh resume_on_full_disk.sh FULL RUN AFTER "NAMES" COMMAND...`
# FULL: an empty folder, mounted here as a 32 MB tmpfs and filled to the last byte; RUN: the run folder,
# copied to FULL/run; AFTER: where the outcome goes (df.txt, stdout.txt, stderr.txt, rc.txt, listing.txt
# and the files NAMES of FULL/run); COMMAND: the train command, which resumes FULL/run.
set -u
full=$1 run=$2 after=$3 names=$4
shift 4
mount -t tmpfs -o size=32m tmpfs "$full" || exit 90
cp -a "$run" "$full/run" || exit 91
dd if=/dev/zero of="$full/filler" bs=64k 2>/dev/null
dd if=/dev/zero of="$full/filler2" bs=4k 2>/dev/null
dd if=/dev/zero of="$full/filler3" bs=1 2>/dev/null
df -k "$full" | tail -1 > "$after/df.txt"
"$@" > "$after/stdout.txt" 2> "$after/stderr.txt"
echo $? > "$after/rc.txt"
ls -a "$full/run" > "$after/listing.txt"
for f in $names; do cp "$full/run/$f" "$after/$f"; done
