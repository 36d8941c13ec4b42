package registrar

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"

	"github.com/envoy-docker-shim/envoy-docker-shim/services/buildinfo"
	"github.com/envoy-docker-shim/envoy-docker-shim/shim/proxyargs"
)

// The shim encodes the few messages it exchanges by hand, in protobuf's wire format, instead of
// linking the protobuf runtime (see package grpcstream for why). Field numbers are those of
// services/registration/proto/registration.proto; wire_test.go checks every message against the
// generated code both ways, so the two cannot drift apart unnoticed.

// registerMethod is Registrar.Register's gRPC path.
const registerMethod = "/envoydockershim.registration.v1.Registrar/Register"

// Open is what the shim registers: registration.v1.Open.
type Open struct {
	Mapping proxyargs.Mapping
	PID     int
	Version string
	// ProxiesItself is set when the shim carries the traffic (UDP) and Envoy must not be configured.
	ProxiesItself bool
	// Serving is set on re-registrations: dockerd was told the port started, and it is served.
	Serving bool
}

// NewOpen is the Open message for m from this process.
func NewOpen(m proxyargs.Mapping, proxiesItself bool) Open {
	return Open{Mapping: m, PID: os.Getpid(), Version: buildinfo.String(), ProxiesItself: proxiesItself}
}

// Registration is what the shim reads of the server's Ready: registration.v1.Registration.
type Registration struct {
	HostPort      uint32
	PID           int32
	ContainerID   string
	ContainerName string
	Service       string
	Listener      string
	Cluster       string
}

// Field numbers and wire types.
const (
	wireVarint = 0
	wireI64    = 1
	wireLen    = 2
	wireGroup  = 3 // deprecated groups: only ever skipped, as unknown fields
	wireEnd    = 4
	wireI32    = 5
)

var protocolNumbers = map[proxyargs.Protocol]uint64{proxyargs.TCP: 1, proxyargs.UDP: 2, proxyargs.SCTP: 3}

func appendTag(b []byte, num int, wire int) []byte {
	return binary.AppendUvarint(b, uint64(num)<<3|uint64(wire))
}

// appendVarint and appendString leave zero values out, as proto3 does.
func appendVarint(b []byte, num int, v uint64) []byte {
	if v == 0 {
		return b
	}
	return binary.AppendUvarint(appendTag(b, num, wireVarint), v)
}

func appendString(b []byte, num int, v string) []byte {
	if v == "" {
		return b
	}
	return appendBytes(b, num, []byte(v))
}

// appendBytes always writes the field: a set message field is present even when empty.
func appendBytes(b []byte, num int, v []byte) []byte {
	b = binary.AppendUvarint(appendTag(b, num, wireLen), uint64(len(v)))
	return append(b, v...)
}

func boolVarint(v bool) uint64 {
	if v {
		return 1
	}
	return 0
}

// marshalOpenRequest is RegisterRequest{open: o}.
func marshalOpenRequest(o Open) []byte {
	var mapping []byte
	mapping = appendVarint(mapping, 1, protocolNumbers[o.Mapping.Proto])
	mapping = appendString(mapping, 2, o.Mapping.HostIP.String())
	mapping = appendVarint(mapping, 3, uint64(o.Mapping.HostPort))
	mapping = appendString(mapping, 4, o.Mapping.ContainerIP.String())
	mapping = appendVarint(mapping, 5, uint64(o.Mapping.ContainerPort))
	var shim []byte
	shim = appendVarint(shim, 1, uint64(int64(int32(o.PID)))) // int32: negative values sign-extend
	shim = appendString(shim, 2, o.Version)
	shim = appendVarint(shim, 3, boolVarint(o.ProxiesItself))
	shim = appendVarint(shim, 4, boolVarint(o.Serving))
	var open []byte
	open = appendBytes(open, 1, mapping)
	open = appendBytes(open, 2, shim)
	return appendBytes(nil, 1, open)
}

// marshalLogRequest is RegisterRequest{log: ShimLog{level, message}}.
func marshalLogRequest(level, message string) []byte {
	var log []byte
	log = appendString(log, 1, level)
	log = appendString(log, 2, message)
	return appendBytes(nil, 2, log)
}

// response is a decoded RegisterResponse: exactly one of ready and failed is set.
type response struct {
	ready  *Registration
	failed *Failed
}

// unmarshalResponse decodes a RegisterResponse. Unknown fields are skipped, as protobuf does.
func unmarshalResponse(b []byte) (response, error) {
	var r response
	err := eachField(b, func(num, wire int, v uint64, data []byte) error {
		switch {
		case num == 1 && wire == wireLen: // ready
			reg, err := unmarshalReady(data)
			if err != nil {
				return fmt.Errorf("ready: %w", err)
			}
			r = response{ready: reg}
		case num == 2 && wire == wireLen: // failed
			f := &Failed{}
			err := eachField(data, func(num, wire int, _ uint64, data []byte) error {
				if num == 1 && wire == wireLen {
					f.Reason = string(data)
				}
				return nil
			})
			if err != nil {
				return fmt.Errorf("failed: %w", err)
			}
			r = response{failed: f}
		}
		return nil
	})
	if err == nil && r.ready == nil && r.failed == nil {
		err = errors.New("neither ready nor failed")
	}
	if err != nil {
		return response{}, fmt.Errorf("malformed answer from envoy-docker-server: %w", err)
	}
	return r, nil
}

func unmarshalReady(b []byte) (*Registration, error) {
	reg := &Registration{}
	err := eachField(b, func(num, wire int, _ uint64, data []byte) error {
		if num != 1 || wire != wireLen {
			return nil
		}
		return eachField(data, func(num, wire int, v uint64, data []byte) error {
			switch {
			case num == 1 && wire == wireLen:
				return eachField(data, func(num, wire int, v uint64, _ []byte) error {
					if num == 3 && wire == wireVarint {
						reg.HostPort = uint32(v)
					}
					return nil
				})
			case num == 2 && wire == wireLen:
				return eachField(data, func(num, wire int, v uint64, _ []byte) error {
					if num == 1 && wire == wireVarint {
						reg.PID = int32(v)
					}
					return nil
				})
			case wire == wireLen:
				if dst := map[int]*string{3: &reg.ContainerID, 4: &reg.ContainerName, 5: &reg.Service, 7: &reg.Listener, 8: &reg.Cluster}[num]; dst != nil {
					*dst = string(data)
				}
			}
			return nil
		})
	})
	return reg, err
}

// eachField calls fn for every field of a message: v for varints and fixed-size values, data for
// length-delimited ones. Groups, a deprecated encoding no field of ours uses, are skipped.
func eachField(b []byte, fn func(num, wire int, v uint64, data []byte) error) error {
	for len(b) > 0 {
		num, wire, v, data, rest, err := readField(b)
		if err != nil {
			return err
		}
		b = rest
		if wire == wireGroup {
			continue
		}
		if err := fn(num, wire, v, data); err != nil {
			return err
		}
	}
	return nil
}

// readField reads one field and returns what follows it.
func readField(b []byte) (num, wire int, v uint64, data, rest []byte, err error) {
	tag, n := binary.Uvarint(b)
	if n <= 0 {
		return 0, 0, 0, nil, nil, errors.New("truncated tag")
	}
	b = b[n:]
	if tag>>3 == 0 || tag>>3 > 1<<29-1 {
		return 0, 0, 0, nil, nil, fmt.Errorf("invalid field number %d", tag>>3)
	}
	num, wire = int(tag>>3), int(tag&7)
	switch wire {
	case wireVarint:
		if v, n = binary.Uvarint(b); n <= 0 {
			return 0, 0, 0, nil, nil, errors.New("truncated varint")
		}
		b = b[n:]
	case wireI64:
		if len(b) < 8 {
			return 0, 0, 0, nil, nil, errors.New("truncated fixed64")
		}
		v, b = binary.LittleEndian.Uint64(b), b[8:]
	case wireI32:
		if len(b) < 4 {
			return 0, 0, 0, nil, nil, errors.New("truncated fixed32")
		}
		v, b = uint64(binary.LittleEndian.Uint32(b)), b[4:]
	case wireLen:
		l, n := binary.Uvarint(b)
		if n <= 0 || l > uint64(len(b)-n) {
			return 0, 0, 0, nil, nil, errors.New("truncated length-delimited field")
		}
		data, b = b[n:n+int(l)], b[n+int(l):]
	case wireGroup:
		for { // skip to the matching end, nested groups included
			if len(b) == 0 {
				return 0, 0, 0, nil, nil, errors.New("unterminated group")
			}
			inner, innerWire, _, _, after, err := readField(b)
			if innerWire == wireEnd {
				if inner != num {
					return 0, 0, 0, nil, nil, errors.New("mismatched end of group")
				}
				b = after
				break
			}
			if err != nil {
				return 0, 0, 0, nil, nil, err
			}
			b = after
		}
	case wireEnd:
		// An end without a start; readField's group case consumes the legitimate ones.
		return num, wire, 0, nil, b, errors.New("end of group outside a group")
	default:
		return 0, 0, 0, nil, nil, fmt.Errorf("unexpected wire type %d", wire)
	}
	return num, wire, v, data, b, nil
}
